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
    inner_steps: int = 10
    inner_lrs: tuple[float, ...] = (0.01, 0.05, 0.1)
    batch_size: int = 64
    seed: int = 0


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
