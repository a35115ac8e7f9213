"""Lock and unlock: split a network into a public base and a secret key, and join them again.

``unlock(base, key)`` is bit-identical to the owner's model: key values are exact copies and
are written back to exactly the positions they came from.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from adaloc.errors import ConfigError, KeyMismatchError
from adaloc.keys import KeyMask, has_norm_layers, rows_view

FILLS = ("zeros", "noise", "matched", "profile")
# fills that take their rows from a second network of the same architecture (lock(donor=))
DONOR_FILLS = ("decoy",)
# measured by bench/attacks.py: hides the key positions best, at no cost (unlock is exact)
DEFAULT_FILL = "matched"
# "matched" fill: multiplicative jitter on a donor row, so no filled row is a copy of a real one
MATCHED_JITTER = 0.15
MATCHED_MODE = "gaussian"


@dataclass
class Key:
    """A key version: the values at the key positions, tied to one base by its fingerprint."""

    mask: KeyMask
    values: dict[str, torch.Tensor]
    base_sha256: str
    version: int = 1
    parent: int | None = None

    def numel(self) -> int:
        """Number of key values (parameters and keyed buffers)."""
        return sum(v.numel() for v in self.values.values())


def _state(obj) -> dict[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` without a copy when it is already a contiguous CPU tensor."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def state_sha256(obj) -> str:
    """Canonical sha256 of a model or state dict: names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(_state(obj).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def outside_key_sha256(obj, mask: KeyMask) -> str:
    """sha256 of every value outside the key; unchanged by any key-only update."""
    h = hashlib.sha256()
    for name, t in sorted(_state(obj).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if name in mask.indices:
            t = t.detach()[~mask.positions(name, t.detach())]
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _check_fits(state: dict[str, torch.Tensor], mask: KeyMask, values=None) -> None:
    """Raise KeyMismatchError unless every key entry fits ``state`` (checked before writing)."""
    for name, idx in mask.indices.items():
        if name not in state:
            raise KeyMismatchError(f"key names tensor {name!r}, which the base does not have")
        rows = rows_view(state[name], mask.granularity)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= rows.shape[0]):
            raise KeyMismatchError(
                f"key indices for {name!r} go up to {int(idx.max())}, "
                f"but the base tensor has {rows.shape[0]} positions"
            )
        if values is not None:
            v = values.get(name)
            want = (idx.numel(), rows.shape[1])
            if v is None or tuple(v.shape) != want:
                got = None if v is None else tuple(v.shape)
                raise KeyMismatchError(f"key values for {name!r} have shape {got}, expected {want}")


def extract_key(model, mask: KeyMask, *, base_sha256: str, version: int = 1, parent=None) -> Key:
    """Copy the values at the key positions of ``model`` into a Key."""
    state = _state(model)
    _check_fits(state, mask)
    values = {}
    for name, idx in mask.indices.items():
        rows = rows_view(state[name].detach(), mask.granularity)
        values[name] = rows[idx.to(rows.device)].to("cpu").clone()
    return Key(mask, values, base_sha256, version, parent)


def _fill(t: torch.Tensor, rows_sel: torch.Tensor, fill: str, g: torch.Generator) -> None:
    if fill == "zeros":
        t[rows_sel] = 0
    else:
        outside = t[~rows_sel].float()
        std = float(outside.std()) if outside.numel() > 1 else 1.0
        noise = torch.randn(int(rows_sel.sum()), generator=g) * std
        t[rows_sel] = noise.to(t.dtype).to(t.device)


def _fill_matched(t: torch.Tensor, idx: torch.Tensor, granularity: str, g: torch.Generator):
    """Fill key rows with values an observer cannot tell from the tensor's real rows.

    Each keyed row gets a *donor*: a random non-key row of the same tensor, its input
    channels (conv) or elements (linear) shuffled, times ``1 + MATCHED_JITTER * N(0, 1)``.
    Row norms, value distribution and, for convolutions, the spatial structure of each
    3x3 kernel are those of real trained rows; the shuffle and the jitter keep a filled row
    from being a near copy of its donor. A tensor keyed whole has no real rows to borrow
    from and is zeroed: the model card names it anyway (norm layers, the head).
    """
    rows = rows_view(t, granularity)
    sel = torch.zeros(rows.shape[0], dtype=torch.bool, device=t.device)
    sel[idx.to(t.device)] = True
    donors = (~sel).nonzero().view(-1).cpu()
    n = int(idx.numel())
    if n == 0:
        return
    if donors.numel() == 0:
        # keyed whole: the card already discloses these positions, so zeros hide nothing
        # more, and a dead tensor keeps the base at chance (a random head would not)
        rows[sel] = 0
        return
    real = rows.detach()[donors.to(t.device)].float().cpu()
    if MATCHED_MODE == "gaussian" and len(donors) > 1:
        # a Gaussian with exactly the real rows' mean and covariance: a random mixture
        # of the centered real rows
        mu = real.mean(0, keepdim=True)
        z = torch.randn(n, len(donors), generator=g) / (len(donors) - 1) ** 0.5
        src = mu + z @ (real - mu)
    else:
        src = real[torch.randint(0, len(donors), (n,), generator=g)]
        if t.dim() == 4 and granularity == "row":  # conv filter: shuffle whole input kernels
            c_in, k = t.shape[1], t.shape[2] * t.shape[3]
            perm = torch.argsort(torch.rand(n, c_in, generator=g), 1)
            src = src.view(n, c_in, k).gather(1, perm[:, :, None].expand(n, c_in, k))
            src = src.reshape(n, -1)
        elif src.shape[1] > 1:
            src = src.gather(1, torch.argsort(torch.rand(src.shape, generator=g), 1))
        src = src * (1 + MATCHED_JITTER * torch.randn(src.shape, generator=g))
    rows[sel] = src.to(t.dtype).to(t.device)


def _nn_dist(prof: torch.Tensor) -> torch.Tensor:
    """Each row's distance to its nearest other row, in normalized |value| profiles."""
    d = torch.cdist(prof, prof).fill_diagonal_(float("inf")).amin(1)
    return torch.where(torch.isfinite(d), d, torch.zeros_like(d))


def _profile(rows: torch.Tensor) -> torch.Tensor:
    return rows.abs().sort(1).values / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _fill_profile(t: torch.Tensor, idx: torch.Tensor, granularity: str, g: torch.Generator):
    """Rows with a real row's value distribution and the real rows' correlation structure.

    The Gaussian ``matched`` fill gives every keyed row near-Gaussian values (a mixture of
    many rows), so per-row kurtosis and the nearest-row profile distance stand out (measured
    by bench/positions_signal.py). Here each keyed row takes the *sorted values* of a random
    donor row (its norm, mean and tails are real), placed in the rank order of a Gaussian
    mixture row (so the pattern across inputs follows the real covariance), times a jitter
    sized so the row's profile distance to its donor is a real nearest-row distance.
    """
    rows = rows_view(t, granularity)
    n = int(idx.numel())
    sel = torch.zeros(rows.shape[0], dtype=torch.bool, device=t.device)
    sel[idx.to(t.device)] = True
    donors = (~sel).nonzero().view(-1).cpu()
    if n == 0:
        return
    if len(donors) < 2 or rows.shape[1] < 2:
        # keyed whole or scalar rows: _fill_matched's rule (zeros / donor values)
        _fill_matched(t, idx, granularity, g)
        return
    real = rows.detach()[donors.to(t.device)].float().cpu()
    mu = real.mean(0, keepdim=True)
    z = torch.randn(n, len(donors), generator=g) / (len(donors) - 1) ** 0.5
    order = torch.argsort(mu + z @ (real - mu), 1)
    pick = torch.randint(0, len(donors), (n,), generator=g)
    vals = real[pick].sort(1).values
    src = torch.empty_like(vals).scatter_(1, order, vals)
    # jitter scale: distance grows ~linearly with it; aim at a real nearest-row distance
    target = _nn_dist(_profile(real))[torch.randint(0, len(donors), (n,), generator=g)]
    xi = torch.randn(src.shape, generator=g)
    unit = (_profile(src * (1 + 0.1 * xi)) - _profile(src)).norm(dim=1) / 0.1
    eps = (target / unit.clamp_min(1e-12)).clamp(0, 0.5)
    rows[sel] = (src * (1 + eps[:, None] * xi)).to(t.dtype).to(t.device)


def default_fill(model: nn.Module) -> str:
    """The library's fill for ``model``: "decoy" for a network without norm layers (with
    :func:`adaloc.harden.default_hardening`'s ``hide_fanout``: its public-like donor rows
    hide the per-row statistics, the rescale the fan-out), :data:`DEFAULT_FILL` otherwise."""
    return DEFAULT_FILL if has_norm_layers(model) else "decoy"


def decoy_mask(mask: KeyMask, state: dict[str, torch.Tensor], seed: int = 0) -> KeyMask:
    """Where a decoy donor is keyed when it is hardened: as many rows per partly keyed
    tensor as ``mask``, drawn from the rows ``mask`` leaves out (a row's bias with it), the
    tensors keyed whole as they are. Hardening pushes the features into the keyed rows, so
    the donor's rows at ``mask``'s positions are then *public-like* rows, which is what the
    decoy fill must look like (donor hardened with ``mask`` itself: its rows look keyed;
    bench/README.md "Attacks")."""
    g, out = torch.Generator().manual_seed(seed), {}
    for n, idx in mask.indices.items():
        rows = rows_view(state[n], mask.granularity).shape[0]
        if idx.numel() in (0, rows) or not n.endswith("weight"):
            out[n] = idx
            continue
        free = torch.ones(rows, dtype=torch.bool)
        free[idx.cpu()] = False
        pool = free.nonzero().view(-1)
        out[n] = torch.sort(pool[torch.randperm(len(pool), generator=g)[: idx.numel()]]).values
    for n in mask.indices:
        w = n[: -len("bias")] + "weight"
        if n.endswith("bias") and w in out and mask.indices[n].numel() < state[n].shape[0]:
            out[n] = out[w]
    return KeyMask(out, mask.granularity)


def decoy_donor(
    donor: nn.Module, mask: KeyMask, model: nn.Module, train, harden=None, *, seed: int = 0
) -> nn.Module:
    """The decoy fill's donor for ``model``: ``donor`` (trained like it) put through the
    recipe's ``harden(model, mask, train)`` with :func:`decoy_mask`'s rows keyed, so its rows
    at ``mask``'s positions are public-like; as it is when the recipe does not harden."""
    if harden is None:
        return donor
    return harden(donor, decoy_mask(mask, model.state_dict(), seed), train)


def _fill_decoy(t: torch.Tensor, d: torch.Tensor | None, name: str, mask: KeyMask) -> None:
    if d is None or d.shape != t.shape:
        raise ConfigError(f"decoy donor has no tensor {name!r} of shape {list(t.shape)}")
    rows, idx = rows_view(t, mask.granularity), mask.indices[name].to(t.device)
    if idx.numel() == rows.shape[0]:
        rows.zero_()  # keyed whole: disclosed by the card; zeros keep the base at chance
    else:
        rows[idx] = rows_view(d, mask.granularity)[idx.to(d.device)].to(t.device, t.dtype)


def lock(
    model: nn.Module,
    mask: KeyMask,
    *,
    fill: str = DEFAULT_FILL,
    seed: int = 0,
    donor: nn.Module | None = None,
):
    """Split ``model`` into (base, key): the base has its key positions filled.

    fill: "zeros" (the paper's: the key positions are visible as zeros), "noise" (Gaussian
    with the spread of the tensor's non-key values) or "matched" (donor rows of the same
    tensor, see :func:`_fill_matched`: the positions do not stand out), "profile"
    (:func:`_fill_profile`), or "decoy": the rows of ``donor``, a second network of the
    same architecture trained (and hardened) like ``model``, at the same positions; every
    filled row is then a real trained row, of another network. Tensors keyed whole are
    zeroed by "decoy" as by "matched" (the card names them; a decoy head would make the
    base a working model).
    """
    if fill not in FILLS + DONOR_FILLS:
        raise ConfigError(f"fill {fill!r} is unknown; use one of {FILLS + DONOR_FILLS}")
    if (donor is None) != (fill not in DONOR_FILLS):
        raise ConfigError(f"fill {fill!r} {'needs' if donor is None else 'takes no'} donor=")
    base = copy.deepcopy(model)
    state = base.state_dict()
    _check_fits(state, mask)
    donor_state = donor.state_dict() if donor is not None else {}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in mask.names:
            t = state[name]
            if fill == "decoy":
                _fill_decoy(t, donor_state.get(name), name, mask)
            elif fill == "profile":
                _fill_profile(t, mask.indices[name], mask.granularity, g)
            elif fill == "matched":
                _fill_matched(t, mask.indices[name], mask.granularity, g)
            else:
                _fill(t, mask.positions(name, t), fill, g)
            if fill != "zeros" and name.endswith("running_var"):
                t.abs_()  # a negative variance would make the base emit NaN, not noise
    base_sha = state_sha256(base)
    return base, extract_key(model, mask, base_sha256=base_sha)


def apply_key(state: dict[str, torch.Tensor], key: Key, *, check_base: bool = True) -> dict:
    """Return a new state dict: ``state`` (a base) with the key values written in.

    Tensors that hold key positions are copies; the others are ``state``'s own tensors
    (shared, not copied: a 45 MB base is not duplicated to change 5% of it), so treat the
    result as read-only or load it into a module, which copies.
    """
    if check_base:
        got = state_sha256(state)
        if got != key.base_sha256:
            raise KeyMismatchError(
                f"key version {key.version} is for base {key.base_sha256[:12]}, "
                f"but this base is {got[:12]}; pull the matching base"
            )
    _check_fits(state, key.mask, key.values)
    out = dict(state)
    for name, idx in key.mask.indices.items():
        out[name] = out[name].clone()
        rows = rows_view(out[name], key.mask.granularity)
        v = key.values[name].to(device=rows.device, dtype=rows.dtype)
        rows[idx.to(rows.device)] = v
    return out


def unlock(base: nn.Module, key: Key, *, check_base: bool = True) -> nn.Module:
    """Authorized model = base + key; the base itself is left untouched."""
    new_state = apply_key(base.state_dict(), key, check_base=check_base)
    model = copy.deepcopy(base)
    model.load_state_dict(new_state)
    return model


def random_key(key: Key, *, seed: int = 0) -> Key:
    """Same positions, random values: an attacker who knows the key's shape but not its values.

    Each tensor's values are drawn from a Gaussian with its true values' mean and spread (a
    strong guess: typical weight statistics are public knowledge); variances stay positive.
    """
    g = torch.Generator().manual_seed(seed)
    values = {}
    for name, v in key.values.items():
        vf = v.float()
        std = float(vf.std()) if v.numel() > 1 else 1.0
        r = torch.randn(v.shape, generator=g) * std + float(vf.mean())
        if name.endswith("running_var"):
            r = r.abs() + 1e-5
        values[name] = r.to(v.dtype)
    return Key(key.mask, values, key.base_sha256, key.version, key.parent)
