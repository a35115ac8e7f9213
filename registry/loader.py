"""Read a site's installed key version back as a ready ``nn.Module``.

::

    from registry.loader import load_model
    served = load_model("/srv/site")              # eval mode, on the best device
    predictions = served.predict(images)          # images: float32 [N, C, H, W] in [0, 1]

:func:`load_model` rebuilds the network from the model card around the cached base's
tensors, writes the key's values at its positions (in place: no second copy of anything but
the key) and checks the result against the owner-signed sha256. :meth:`LoadedModel.preprocess`
is what a caller feeds it through: input checks, the device, and the M-LOCK token stamp when
one is installed. :func:`swap_key` writes the next version's key positions in place under a
lock, which is how ``adaloc serve`` hot-swaps a key.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from registry.errors import IntegrityError, NotFoundError, RegistryError


class InputError(RegistryError, ValueError):
    """Inputs a model cannot take: wrong shape, dtype, or values outside [0, 1]."""


@dataclass(frozen=True)
class InstalledFiles:
    """The bytes of a site's installed key version (read from one consistent installed set)."""

    version: int
    base_path: Path | None  # None: a key swapped in from memory (swap_key(pulled=))
    key: bytes
    card: bytes
    token: bytes | None
    base_sha256: str
    model_sha256: str


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers (no starvation).

    The standard library has none, and a swap needs no more than this.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = self._waiting = 0
        self._writer = False

    @contextmanager
    def read(self):
        """Held by each request for its whole forward pass (not re-entrant)."""
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        """Held by a swap: waits for in-flight requests, then excludes all of them."""
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class LoadedModel:
    """An installed key version, ready to answer: the module and how to feed it.

    A swap (:func:`swap_key`) rewrites only the key positions of the module's own tensors,
    under ``lock``'s write side; requests run under its read side, so each one runs wholly
    on one version and reads ``version`` consistently (:meth:`answer`).
    """

    model: nn.Module
    version: int
    base_sha256: str
    model_sha256: str
    card: object  # adaloc.artifact.ModelCard
    token: object | None  # adaloc.token.Token, stamped on every input when present
    device: torch.device
    key: object = field(repr=False)  # adaloc.lock.Key written into ``model`` now
    base_rows: dict = field(repr=False)  # the base's values at ``key``'s positions
    lock: ReadWriteLock = field(default_factory=ReadWriteLock, repr=False)
    # The module's own tensors by name (its state_dict) and their row views by (name,
    # granularity), made once: a swap writes into them (parameters are never replaced).
    state: dict | None = field(default=None, repr=False)
    views: dict = field(default_factory=dict, repr=False)

    @property
    def keyed(self) -> tuple[str, ...]:
        """Names of the tensors that hold key positions."""
        return tuple(self.key.mask.indices)

    @property
    def keyed_bytes(self) -> int:
        """Bytes a swap writes (the key's values): the extra memory of a swap, about."""
        return sum(v.numel() * v.element_size() for v in self.key.values.values())

    def preprocess(self, images) -> torch.Tensor:
        """Check ``images`` (float32 ``[N, C, H, W]`` in [0, 1], as the dataset tensors are),
        move them to the model's device and stamp the token when one is installed."""
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
        want = tuple(self.card.input_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise InputError(
                f"inputs have shape {tuple(x.shape)}; expected [N, {', '.join(map(str, want))}]"
            )
        if not x.is_floating_point():
            raise InputError(f"inputs have dtype {x.dtype}; expected float32 in [0, 1]")
        x = x.to(device=self.device, dtype=torch.float32)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise InputError("inputs should be finite values in [0, 1] (scale pixels by 1/255)")
        if self.token is not None:
            from adaloc.token import stamp

            x = stamp(x, self.token)
        return x

    @torch.inference_mode()
    def answer(self, images) -> tuple[torch.Tensor, int]:
        """(raw outputs ``[N, K]`` on the CPU, the key version that computed them)."""
        with self.lock.read():
            return self.model(self.preprocess(images)).float().cpu(), self.version

    def logits(self, images) -> torch.Tensor:
        """Raw outputs ``[N, K]`` (on the CPU) for ``images`` (see :meth:`preprocess`)."""
        return self.answer(images)[0]

    def predict(self, images) -> list[int]:
        """Class index per image (argmax of the logits)."""
        return self.logits(images).argmax(1).tolist()


def installed_files(site) -> InstalledFiles:
    """The one place that knows a site's folder layout (``registry.site``)."""
    s = site.installed_set(verify=True)
    if s is None:
        raise NotFoundError(f"nothing is installed in {site.directory}; run `adaloc site pull`")
    token = s.token_path.read_bytes() if s.token_path else None
    return InstalledFiles(
        s.version, s.base_path, s.key_path.read_bytes(), s.card_path.read_bytes(), token,
        s.base_sha256, s.model_sha256,
    )  # fmt: skip


def _site(site_or_dir):
    from registry.site import Site

    return site_or_dir if hasattr(site_or_dir, "installed") else Site(Path(site_or_dir))


def _module(card, state: dict, device: torch.device) -> nn.Module:
    """The card's network whose parameters *are* ``state``'s tensors (no copy)."""
    from adaloc.errors import ModelError
    from adaloc.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(card.builder, **card.kwargs)
        model.load_state_dict(state, strict=True, assign=True)
    except (ModelError, RuntimeError, TypeError) as err:
        raise IntegrityError(
            f"installed model does not fit its card ({card.builder}): {err}"
        ) from err
    return model.to(device).eval()


def _decode_key(files: InstalledFiles):
    from adaloc.artifact import decode_key

    key = decode_key(files.key)
    if key.version != files.version or key.base_sha256 != files.base_sha256:
        raise IntegrityError(
            f"installed key says version {key.version} / base {key.base_sha256[:12]}, the "
            f"installed set says {files.version} / {files.base_sha256[:12]}; pull again"
        )
    return key


def _rows(state: dict, name: str, granularity: str, views: dict | None = None) -> torch.Tensor:
    """``state[name]`` as rows at ``granularity`` (a view); kept in ``views`` when given."""
    from adaloc.keys import rows_view

    if views is not None and (got := views.get((name, granularity))) is not None:
        return got
    t = state[name]
    rows = rows_view(t, granularity)
    if rows.data_ptr() != t.data_ptr() or not t.is_contiguous():
        raise IntegrityError(f"tensor {name} cannot be written in place")  # never for our nets
    if views is not None:
        views[name, granularity] = rows
    return rows


def _same_positions(key, old) -> bool:
    """True when ``key`` keys exactly ``old``'s positions (every key-only update)."""
    if old is None or key.mask.granularity != old.mask.granularity:
        return False
    a, b = key.mask.indices, old.mask.indices
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@torch.no_grad()
def _write_key(
    state: dict, key, old=None, base_rows: dict | None = None, views: dict | None = None
) -> dict:
    """Write ``key``'s values into ``state``'s own tensors (in place); return the base's
    values at its positions. ``old`` (the key written now) and its ``base_rows`` put the base
    back first where the positions differ, so any key can follow any other. ``views``: the
    row views of earlier writes (see LoadedModel.views), reused and extended."""
    from adaloc.errors import KeyMismatchError
    from adaloc.lock import _check_fits

    g = key.mask.granularity
    if _same_positions(key, old):  # positions already checked against state: shapes only
        for name in key.mask.indices:
            v = key.values.get(name)
            want = tuple(old.values[name].shape)
            if v is None or tuple(v.shape) != want:
                got = None if v is None else tuple(v.shape)
                raise KeyMismatchError(f"key values for {name!r} have shape {got}, expected {want}")
        for name, idx in key.mask.indices.items():
            rows = _rows(state, name, g, views)
            rows.index_copy_(0, idx.to(rows.device), key.values[name].to(rows.device, rows.dtype))
        return dict(base_rows or {})
    _check_fits(state, key.mask, key.values)  # before any write
    rows_out = dict(base_rows or {})
    if old is not None:
        for name, idx in old.mask.indices.items():
            new_idx = key.mask.indices.get(name)
            if new_idx is None or g != old.mask.granularity or not torch.equal(idx, new_idx):
                _rows(state, name, old.mask.granularity, views)[idx.to(state[name].device)] = (
                    rows_out.pop(name)
                )
    for name, idx in key.mask.indices.items():
        rows = _rows(state, name, g, views)
        idx = idx.to(rows.device)
        if name not in rows_out:
            rows_out[name] = rows[idx].clone()
        rows[idx] = key.values[name].to(device=rows.device, dtype=rows.dtype)
    return rows_out


def _check(state: dict, files: InstalledFiles) -> None:
    from adaloc.lock import state_sha256

    if files.model_sha256 and state_sha256(state) != files.model_sha256:
        raise IntegrityError(
            f"base + key v{files.version} differs from the owner-signed model sha256 "
            f"{files.model_sha256[:12]}; pull again"
        )


def load_model(site_dir, *, device: str | None = None, verify: bool = True) -> LoadedModel:
    """The installed key version of the site at ``site_dir`` (a path or a ``Site``) as a
    ready module in eval mode on ``device`` (default: the best one), checked against the
    owner-signed model sha256 unless ``verify=False``."""
    from adaloc.artifact import ModelCard, decode_base
    from adaloc.device import best_device
    from adaloc.errors import KeyFormatError
    from adaloc.token import Token

    files = installed_files(_site(site_dir))
    dev = best_device(device)
    try:
        card = ModelCard.from_json(files.card.decode())
        base_state, _ = decode_base(files.base_path.read_bytes(), verify=False)
        token = Token.from_bytes(files.token) if files.token else None
    except (KeyFormatError, OSError, ValueError) as err:
        raise IntegrityError(f"installed key version {files.version} is unusable: {err}") from err
    key = _decode_key(files)
    model = _module(card, {k: v.to(dev) for k, v in base_state.items()}, dev)
    state = model.state_dict()  # the module's own tensors (views): written in place
    views: dict = {}
    base_rows = _write_key(state, key, views=views)
    if verify:
        _check(state, files)
    return LoadedModel(
        model, files.version, files.base_sha256, files.model_sha256, card, token, dev,
        key, base_rows, state=state, views=views,
    )  # fmt: skip


def swap_key(current: LoadedModel, site_dir, *, verify: bool = False, pulled=None) -> LoadedModel:
    """Write the site's newly installed key version into ``current`` in place: only the key
    positions change, under ``current.lock``'s write side (in-flight requests finish on the
    old values first; none runs on a mix). Returns ``current``. ``verify`` re-hashes the whole
    model against the signed sha256 (off by default: the installed key was checked against
    its signed sha256 when it was pulled) and puts the old key back when it differs.

    ``pulled``: the ``PullResult`` of a pull this process just made; when it installed a
    version, its verified key (in memory) is swapped in, not the files read back from disk.
    """
    from adaloc.artifact import ModelCard
    from adaloc.token import Token

    got = getattr(pulled, "verified", None)
    if got is not None:
        files = InstalledFiles(
            pulled.version, None, b"", got.card, got.token, pulled.base_sha256,
            pulled.model_sha256,
        )  # fmt: skip
    else:
        files = installed_files(_site(site_dir))
    if files.base_sha256 != current.base_sha256:
        raise IntegrityError(
            f"installed key version {files.version} is for base {files.base_sha256[:12]}; this "
            f"server holds base {current.base_sha256[:12]}: restart it to change base"
        )
    card = ModelCard.from_json(files.card.decode())
    # everything that can fail before the lock is done first
    key = got.key if got is not None else _decode_key(files)
    token = Token.from_bytes(files.token) if files.token else None
    with current.lock.write():
        if current.state is None:
            current.state = current.model.state_dict()
        state, views = current.state, current.views
        old, old_rows = current.key, current.base_rows
        rows = _write_key(state, key, old, old_rows, views)
        if verify:
            try:
                _check(state, files)
            except IntegrityError:
                _write_key(state, old, key, rows, views)
                raise
        current.key, current.base_rows, current.card, current.token = key, rows, card, token
        current.version, current.model_sha256 = files.version, files.model_sha256
    return current
