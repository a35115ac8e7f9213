"""Read a site's installed key version back as a ready ``nn.Module``.

::

    from registry.loader import load_model
    served = load_model("/srv/site")              # eval mode, on the best device
    predictions = served.predict(images)          # images: float32 [N, C, H, W] in [0, 1]

:func:`load_model` rebuilds the network from the model card, writes the key into the cached
base (only the keyed tensors are new; the rest are the base's own tensors) and checks the
result against the owner-signed sha256. :meth:`LoadedModel.preprocess` is what a caller
feeds it through: input checks, the device, and the M-LOCK token stamp when one is
installed. :func:`swap_key` builds the next version's module around the same base tensors,
which is how ``adaloc serve`` hot-swaps a key without a second copy of the base.
"""

from __future__ import annotations

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
    base_path: Path
    key: bytes
    card: bytes
    token: bytes | None
    base_sha256: str
    model_sha256: str


@dataclass
class LoadedModel:
    """An installed key version, ready to answer: the module and how to feed it."""

    model: nn.Module
    version: int
    base_sha256: str
    model_sha256: str
    card: object  # adaloc.artifact.ModelCard
    token: object | None  # adaloc.token.Token, stamped on every input when present
    device: torch.device
    base_state: dict = field(repr=False)  # the base's tensors, shared with every version
    keyed: tuple[str, ...] = ()  # names of the tensors this version holds its own copy of

    @property
    def keyed_bytes(self) -> int:
        """Bytes held by this version alone (its keyed tensors): the extra memory of a swap."""
        state = self.model.state_dict()
        return sum(state[n].numel() * state[n].element_size() for n in self.keyed)

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
    def logits(self, images) -> torch.Tensor:
        """Raw outputs ``[N, K]`` (on the CPU) for ``images`` (see :meth:`preprocess`)."""
        return self.model(self.preprocess(images)).float().cpu()

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


def _with_key(files: InstalledFiles, base_state: dict, *, check: bool) -> tuple[dict, tuple]:
    from adaloc.artifact import decode_key
    from adaloc.lock import apply_key, state_sha256

    key = decode_key(files.key)
    if key.version != files.version or key.base_sha256 != files.base_sha256:
        raise IntegrityError(
            f"installed key says version {key.version} / base {key.base_sha256[:12]}, the "
            f"installed set says {files.version} / {files.base_sha256[:12]}; pull again"
        )
    state = apply_key(base_state, key, check_base=False)
    if check and files.model_sha256 and state_sha256(state) != files.model_sha256:
        raise IntegrityError(
            f"base + key v{files.version} differs from the owner-signed model sha256 "
            f"{files.model_sha256[:12]}; pull again"
        )
    return state, tuple(key.mask.indices)


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
    base_state = {k: v.to(dev) for k, v in base_state.items()}
    state, keyed = _with_key(files, base_state, check=verify)
    return LoadedModel(
        _module(card, state, dev), files.version, files.base_sha256, files.model_sha256,
        card, token, dev, base_state, keyed,
    )  # fmt: skip


def swap_key(current: LoadedModel, site_dir, *, verify: bool = False) -> LoadedModel:
    """The site's newly installed key version around ``current``'s base tensors: only the
    keyed tensors are new; ``current`` itself is left untouched (in-flight calls finish on
    it). ``verify`` re-hashes the whole model against the signed sha256 (off by default:
    the installed key was checked against its signed sha256 when it was pulled)."""
    from adaloc.artifact import ModelCard
    from adaloc.token import Token

    files = installed_files(_site(site_dir))
    if files.base_sha256 != current.base_sha256:
        raise IntegrityError(
            f"installed key version {files.version} is for base {files.base_sha256[:12]}; this "
            f"server holds base {current.base_sha256[:12]}: restart it to change base"
        )
    card = ModelCard.from_json(files.card.decode())
    state, keyed = _with_key(files, current.base_state, check=verify)
    token = Token.from_bytes(files.token) if files.token else None
    return LoadedModel(
        _module(card, state, current.device), files.version, files.base_sha256,
        files.model_sha256, card, token, current.device, current.base_state, keyed,
    )  # fmt: skip
