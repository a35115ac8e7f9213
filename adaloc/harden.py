"""SOPHON-style non-transferable training: make the weights outside the key a bad start.

After normal training and key selection, the owner keeps training all weights on two
objectives at once: the key holder's loss (cross-entropy of base + key), and the outcome of
a *simulated attacker* that refills the key positions from a fresh initialisation and
fine-tunes every weight for a few SGD steps on a batch of the owner's images. The
attacker's outputs after those steps are pushed towards the uniform distribution (SOPHON's
fine-tuning suppression, S&P 2024), with a first-order (FOMAML) gradient: the attacker's
gradient at its end point, applied to the weights outside the key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adaloc.keys import KeyMask


@dataclass(frozen=True)
class HardenConfig:
    """Outer loop (owner, Adam) and inner loop (simulated attacker, SGD) settings."""

    steps: int = 400
    lr: float = 1e-3
    alpha: float = 1.0
    objective: str = "finetune"  # or "probe": ridge probes on the refilled hidden layers
    probe_batch: int = 256
    ridge: float = 1.0
    inner_steps: int = 10
    inner_lrs: tuple[float, ...] = (0.01, 0.05, 0.1)
    batch_size: int = 64
    seed: int = 0
    # after the probe training: Adam steps on the key positions only (owner CE). The
    # attacks refill the key positions, so this changes nothing an attacker starts from,
    # and it gives back the authorized accuracy the probe term cost.
    polish_steps: int = 300
    polish_lr: float = 1e-3
    polish_batch: int = 128
    # then :func:`hide_fanout` (function kept): the keyed units' outgoing weights, which the
    # training grows, get public units' norms (the fan-out gave the positions away)
    hide_fanout: bool = False


def _uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the uniform distribution: lowest when the output says nothing."""
    return -torch.log_softmax(logits, 1).mean()


@torch.no_grad()
def _refilled(att: nn.Module, model: nn.Module, fresh: nn.Module, pos: dict) -> None:
    """``att`` := ``model`` with the key positions (params and keyed buffers) from ``fresh``."""
    new, own = fresh.state_dict(), model.state_dict()
    for name, t in att.state_dict().items():
        src = own[name]
        t.copy_(torch.where(pos[name], new[name], src) if name in pos else src)


def nontransferable(
    model: nn.Module,
    mask: KeyMask,
    train,
    make_fresh: Callable[[], nn.Module],
    cfg: HardenConfig = HardenConfig(),
) -> nn.Module:
    """A copy of ``model`` trained to stay accurate with its key and resist refill + fine-tune.

    ``mask`` stays valid (positions, not values); lock the result with it.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    model = copy.deepcopy(model).cpu().float().train()
    att = copy.deepcopy(model)
    pos = {n: mask.positions(n, t) for n, t in model.state_dict().items() if n in mask.indices}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(train)

    def batch():
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        return train.x[idx], train.y[idx]

    if cfg.objective == "probe":
        return _probe_train(model, pos, train, make_fresh, cfg, g)
    for step in range(cfg.steps):
        torch.manual_seed(cfg.seed * 100_003 + step)
        _refilled(att, model, make_fresh(), pos)
        att.train()
        lr = cfg.inner_lrs[int(torch.randint(0, len(cfg.inner_lrs), (1,), generator=g))]
        inner = torch.optim.SGD(att.parameters(), lr=lr, momentum=0.9)
        for _ in range(cfg.inner_steps):
            xb, yb = batch()
            inner.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(att(xb), yb).backward()
            inner.step()
        xa, _ = batch()
        grads = torch.autograd.grad(_uniform_ce(att(xa)), list(att.parameters()))
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for (name, p), ga in zip(model.named_parameters(), grads, strict=True):
                if name in pos:
                    ga = ga.masked_fill(pos[name], 0.0)  # the attacker's key is not ours
                p.grad.add_(ga, alpha=cfg.alpha)
        opt.step()
    return model.eval()


def _r2(ha: torch.Tensor, ya: torch.Tensor, hb: torch.Tensor, yb: torch.Tensor, lam: float):
    """R^2 on batch b of a ridge probe fitted on batch a (features standardized on a)."""
    mu, sd = ha.mean(0), ha.std(0).clamp_min(1e-3)
    za, zb = (ha - mu) / sd, (hb - mu) / sd
    ym = ya.mean(0)
    eye = torch.eye(za.shape[1], dtype=za.dtype)
    w = torch.linalg.solve(za.T @ za + lam * len(za) * eye, za.T @ (ya - ym))
    err = (zb @ w + ym - yb).pow(2).sum()
    return 1 - err / (yb - yb.mean(0)).pow(2).sum().clamp_min(1e-12)


def _probe_train(model, pos, train, make_fresh, cfg: HardenConfig, g) -> nn.Module:
    """Owner CE + alpha * R^2 of linear probes on every hidden ReLU of the refilled network.

    The refill puts fresh values at the key positions; the probes see only what the base
    publishes, so the gradient pushes the public features to carry nothing linear about y.
    """
    from torch.func import functional_call

    acts: list[torch.Tensor] = []
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]

    def hook(_m, _i, out):
        acts.append(out.mean((2, 3)) if out.dim() == 4 else out)

    handles = [m.register_forward_hook(hook) for m in relus]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n, k = len(train), int(train.y.max()) + 1
    try:
        for step in range(cfg.steps):
            torch.manual_seed(cfg.seed * 100_003 + step)
            fresh = dict(make_fresh().state_dict())
            idx = torch.randint(0, n, (2 * min(cfg.probe_batch, n // 2),), generator=g)
            x, y = train.x[idx], train.y[idx]
            state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            att = {
                name: torch.where(pos[name], fresh[name], t) if name in pos else t
                for name, t in state.items()
            }
            acts.clear()
            functional_call(model, att, (x,))
            half = len(x) // 2
            yo = nn.functional.one_hot(y, k).float()
            r2 = torch.stack(
                [_r2(h[:half], yo[:half], h[half:], yo[half:], cfg.ridge) for h in acts]
            )
            acts.clear()
            loss = nn.functional.cross_entropy(model(x[:half]), y[:half])
            acts.clear()
            opt.zero_grad(set_to_none=True)
            (loss + cfg.alpha * r2.clamp_min(0).mean()).backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    key_polish(model, pos, train, cfg, g)
    return model.eval()


def key_polish(model: nn.Module, pos: dict, train, cfg: HardenConfig, g) -> None:
    """Owner cross-entropy on the key positions only; every other value stays bit-identical."""
    if cfg.polish_steps <= 0:
        return
    params = [(n, p) for n, p in model.named_parameters() if n in pos]
    if not params:
        return
    frozen = {n: p.detach().clone() for n, p in params}
    opt = torch.optim.Adam([p for _, p in params], lr=cfg.polish_lr)
    n = len(train)
    model.train()
    for _ in range(cfg.polish_steps):
        idx = torch.randint(0, n, (min(cfg.polish_batch, n),), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
        grads = torch.autograd.grad(loss, [p for _, p in params])
        for (name, p), gr in zip(params, grads, strict=True):
            p.grad = gr.masked_fill(~pos[name], 0.0)
        opt.step()
        with torch.no_grad():
            for name, p in params:
                p.copy_(torch.where(pos[name], p, frozen[name]))


_PASS = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity)


def _chain_pairs(model: nn.Module) -> list:
    """``(producer, its BatchNorm or None, consumer)`` module pairs of an ``nn.Sequential``
    chain where only ReLU-like (positively homogeneous) layers sit between the two: scaling a
    producer unit's output by a > 0 and the consumer's input column by 1 / a keeps the
    function."""
    mods = list(model.named_children()) if isinstance(model, nn.Sequential) else []
    pairs, producer = [], None
    for name, m in mods:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if producer is not None:
                pairs.append((producer[0], producer[1], (name, m)))
            producer = [(name, m), None]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and producer is not None:
            producer[1] = m
        elif not isinstance(m, _PASS):
            producer = None  # anything else: not known to commute with positive scaling
    return pairs


def _rescale(p: nn.Module, bn, cols: torch.Tensor, a: torch.Tensor) -> None:
    """Unit j's output times a[j] (its row and bias, or its BatchNorm scale and shift), its
    outgoing column divided by a[j]: the same function."""
    cols.div_(a[None, :, None])
    if bn is not None:
        bn.weight.mul_(a)
        bn.bias.mul_(a)
    else:
        p.weight.mul_(a.view(-1, *([1] * (p.weight.dim() - 1))))
        if p.bias is not None:
            p.bias.mul_(a)


@torch.no_grad()
def balance_fanout(model: nn.Module, mask: KeyMask | None = None) -> nn.Module:
    """Give every hidden unit the same outgoing weight norm, without changing the function.

    The position detector's strongest signal against a data-aware key is the *fan-out*: the
    norm of what a keyed unit feeds into the next layer, a public tensor the fill cannot
    touch (bench/positions_signal.py). ReLU nets are positively homogeneous: scaling a
    unit's output by a > 0 (its row and bias, or its BatchNorm scale and shift) and its
    outgoing column by 1 / a computes the same function, so each column is set to the
    layer's mean norm. Pairs are balanced from the top down (each step changes only the
    rows of the layer below); a consumer keyed whole (the head) hides its columns anyway
    and is skipped. Works on ``nn.Sequential`` chains (cnn, mlp); returns a new model.
    """
    model = copy.deepcopy(model)
    whole = set()
    if mask is not None:
        state = model.state_dict()
        whole = {n for n, i in mask.indices.items() if i.numel() == len(state[n]) and n in state}
    for (_pname, p), bn, (cname, c) in reversed(_chain_pairs(model)):
        if f"{cname}.weight" in whole:
            continue
        units = bn.num_features if bn is not None else p.weight.shape[0]
        if c.weight.shape[1] % units:
            continue
        cols = c.weight.view(c.weight.shape[0], units, -1)
        norm = cols.pow(2).sum((0, 2)).sqrt()
        _rescale(p, bn, cols, (norm / norm.mean()).clamp_min(1e-6))
    return model


@torch.no_grad()
def hide_fanout(model: nn.Module, mask: KeyMask, *, seed: int = 0) -> nn.Module:
    """Give each *keyed* unit the fan-out of a random public unit of its layer, keeping the
    function: its row (secret: in the key) and its outgoing column (public) are rescaled as
    in :func:`balance_fanout`, while public units are left as they are.

    Where :func:`balance_fanout` changes every public row (and so moved the signal into the
    row norms), this touches only what the key hides plus the keyed units' columns, whose
    norms become draws from the public units' own norms. Training that leans on the key
    (the probe hardening) grows the keyed units' outgoing weights whatever the selection;
    this is applied after it, just before the lock. Row-granularity keys on
    ``nn.Sequential`` chains; a producer keyed whole (no public unit to copy), a consumer
    keyed whole (its columns are hidden) or a BatchNorm outside the key (it would carry the
    scale in public) is skipped. Returns a new model."""
    model = copy.deepcopy(model)
    if mask.granularity != "row":
        return model
    g = torch.Generator().manual_seed(seed)
    names = {id(m): n for n, m in model.named_modules()}

    def whole(module: nn.Module) -> bool:
        idx = mask.indices.get(f"{names[id(module)]}.weight")
        return idx is not None and idx.numel() == module.weight.shape[0]

    for (pname, p), bn, (_cname, c) in reversed(_chain_pairs(model)):
        keyed = mask.indices.get(f"{pname}.weight")
        units = p.weight.shape[0]
        if (
            keyed is None
            or keyed.numel() in (0, units)
            or c.weight.shape[1] % units
            or whole(c)
            or (bn is not None and not whole(bn))
        ):
            continue
        cols = c.weight.view(c.weight.shape[0], units, -1)
        norm = cols.pow(2).sum((0, 2)).sqrt()
        public = torch.ones(units, dtype=torch.bool)
        public[keyed] = False
        pool = norm[public.to(norm.device)].cpu()
        target = pool[torch.randint(0, len(pool), (keyed.numel(),), generator=g)]
        a = torch.ones(units)
        a[keyed] = (norm[keyed.to(norm.device)].cpu() / target.clamp_min(1e-12)).clamp_min(1e-6)
        _rescale(p, bn, cols, a.to(norm.device, norm.dtype))
    return model


# the norm-free default: alpha 6, probes on every hidden ReLU, then the key-only polish
# (bench/README.md "MLP hardening": alpha 3 leaked +2.6 / +2.9 at 5% on two of three
# Fashion-MNIST owners; alpha 6 stayed <= +1.4 on digits and on both of those owners), then
# hide_fanout, with the "decoy" fill (adaloc.lock.default_fill): position recall 20-56% ->
# 0-8% at no leak cost (bench/README.md "The norm-free default hides its positions")
NORM_FREE_HARDENING = HardenConfig(objective="probe", alpha=6.0, hide_fanout=True)


def default_hardening(model: nn.Module) -> HardenConfig | None:
    """The library's hardening for ``model``: one rule per kind of architecture.

    With norm layers: None (the norm layers in the key already cut the network; the probe
    training cost the CNN 4.2 authorized points). Without: :data:`NORM_FREE_HARDENING`,
    used with :func:`adaloc.keys.default_spec`'s ``selection="first"``.
    """
    from adaloc.keys import has_norm_layers

    return None if has_norm_layers(model) else NORM_FREE_HARDENING


def harden_default(
    model: nn.Module, mask: KeyMask, train, make_fresh: Callable[[], nn.Module]
) -> nn.Module:
    """``model`` hardened by :func:`default_hardening`'s rule (returned as is when None)."""
    cfg = default_hardening(model)
    if cfg is None:
        return model
    model = nontransferable(model, mask, train, make_fresh, cfg)
    return hide_fanout(model, mask, seed=cfg.seed) if cfg.hide_fanout else model
