"""Training loops: full training, and key-only training that cannot move anything outside the key.

Key-only training is enforced by construction, not by convention (the public AdaLoc code
only zeroed gradients, so biases, BatchNorm statistics, momentum with weight decay and
AdamW's decoupled decay still moved the "frozen" network):

1. tensors without key positions are excluded from the optimizer and get no gradient;
2. gradients of keyed tensors are exactly zero outside the key positions (so momentum and
   Adam moments stay zero there): a partly keyed convolution computes only its key rows'
   weight gradient (:mod:`adaloc.keygrad`, cheaper than full fine-tuning's), any other
   partly keyed tensor gets its gradient masked;
3. an optimizer step then leaves every non-key value bit-identical unless weight decay
   moves it (SGD, Adam and AdamW without decay step by zero where the gradient was always
   zero), so the non-key values of partly keyed tensors are written back from a snapshot
   after every step only when ``weight_decay > 0``, and otherwise once per epoch (a no-op
   kept so the guarantee does not rest on the optimizer's arithmetic alone);
4. BatchNorm layers whose statistics are not in the key run in eval mode; buffers outside
   the key (e.g. ``num_batches_tracked`` of a keyed BatchNorm, which only counts steps) are
   written back at every epoch end (before any callback sees the model) and at close.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from adaloc import keygrad
from adaloc.device import autocast, best_device, grad_scaler
from adaloc.errors import ConfigError
from adaloc.keys import KeyMask

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Optimizer and loop settings shared by full and key-only training."""

    epochs: int = 2
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    amp: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown; use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; use one of {SCHEDULES}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"epochs and batch_size should be >= 1, got {self.epochs} and {self.batch_size}"
            )
        if not self.lr > 0:
            raise ConfigError(f"lr should be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        """Plain dict, for logging."""
        return asdict(self)


@dataclass
class TrainReport:
    """What a training call did."""

    seconds: float
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss per epoch


class KeyGuard:
    """Confines training of ``model`` to the positions of ``mask`` (see module docstring)."""

    def __init__(self, model: nn.Module, mask: KeyMask):
        self.model, self.mask = model, mask
        state = model.state_dict(keep_vars=True)
        missing = [n for n in mask.names if n not in state]
        if missing:
            raise ConfigError(f"key mask names tensors the model does not have: {missing[:3]}")
        self._pos = {n: mask.positions(n, state[n].detach()) for n in mask.names}
        params = dict(model.named_parameters())
        self._requires = {n: p.requires_grad for n, p in params.items()}
        self._hooks, self._restricted = [], []
        modules = dict(model.named_modules())
        for n, p in params.items():
            if n not in self._pos:
                p.requires_grad_(False)
                continue
            p.requires_grad_(True)
            if bool(self._pos[n].all()):  # a wholly keyed tensor needs no mask
                continue
            owner, _, leaf = n.rpartition(".")
            module = modules.get(owner)
            if mask.granularity == "row" and leaf == "weight" and keygrad.supports(module):
                keygrad.restrict_weight_grad(module, mask.indices[n])
                self._restricted.append(module)
            else:
                # masked_fill, not a product: a NaN gradient must not reach non-key values
                off = ~self._pos[n]
                self._hooks.append(p.register_hook(lambda g, off=off: g.masked_fill(off, 0)))
        # Snapshot of everything that could change: partly keyed tensors' non-key values and
        # buffers outside the key (a full per-step write-back cost ~10% of a key-only epoch).
        buffers = dict(model.named_buffers())
        self._partial = {
            n: (state[n], self._pos[n], state[n].detach()[~self._pos[n]].clone())
            for n in self._pos
            if not bool(self._pos[n].all())
        }
        self._flat: dict[int, torch.Tensor] = {}
        self._buffers = {
            n: (t, t.detach().clone()) for n, t in buffers.items() if n not in self._pos
        }

    def trainable(self) -> list[nn.Parameter]:
        """Parameters that hold key positions: the only ones an optimizer should get."""
        return [p for n, p in self.model.named_parameters() if n in self._pos]

    def set_modes(self) -> None:
        """Train mode, but BatchNorm whose statistics are outside the key runs in eval mode."""
        self.model.train()
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                prefix = f"{name}." if name else ""
                if prefix + "running_mean" not in self._pos:
                    module.eval()

    @torch.no_grad()
    def restore(self) -> None:
        """Write the non-key values of partly keyed tensors back to their snapshot."""
        for live, pos, frozen in self._partial.values():
            # Flat positions are computed once; a tensor in another memory layout (evaluation
            # switches conv nets to channels-last and back) takes the boolean-mask path.
            data = live.data
            if data.is_contiguous():
                data.view(-1).index_copy_(0, self._flat_outside(pos), frozen)
            else:
                data[~pos] = frozen

    def _flat_outside(self, pos: torch.Tensor) -> torch.Tensor:
        key = id(pos)
        if key not in self._flat:
            self._flat[key] = (~pos).reshape(-1).nonzero().squeeze(1)
        return self._flat[key]

    @torch.no_grad()
    def restore_buffers(self) -> None:
        """Write buffers outside the key (e.g. BatchNorm step counters) back."""
        for live, frozen in self._buffers.values():
            live.copy_(frozen)

    def close(self) -> None:
        """Restore buffers, remove hooks and restore the requires_grad flags."""
        self.restore()
        self.restore_buffers()
        for h in self._hooks:
            h.remove()
        for module in self._restricted:
            keygrad.release(module)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires[n])


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay), AdamW or Adam over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def moves_without_gradient(cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s optimizer can move a value whose gradient is always zero (decay)."""
    return cfg.weight_decay > 0


def _batches(n: int, batch_size: int, g: torch.Generator):
    order = torch.randperm(n, generator=g)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) > 1 or n == 1:  # a lone sample breaks BatchNorm in train mode
            yield idx


def cosine_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Per-step cosine decay to zero over ``total_steps`` (None for a constant rate)."""
    if cfg.schedule != "cosine":
        return None
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )


def index_epochs(train, batches: Callable[[], Iterator[torch.Tensor]]):
    """Epoch factory over an in-memory ImageSet: ``batches()`` yields index tensors."""
    return lambda: ((train.x[idx], train.y[idx]) for idx in batches())


def run_loop(
    model: nn.Module,
    cfg: TrainConfig,
    *,
    forward: nn.Module,
    epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    device: torch.device,
    guard: KeyGuard | None,
    generator: torch.Generator | None = None,
    batch_fn: Callable | None = None,
    loss_fn: Callable | None = None,
    on_epoch_end: Callable[[int, nn.Module], bool | None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainReport:
    """The training loop shared by :func:`fit` and DDP training.

    ``forward`` is the module called on batches (``model`` itself or its DDP wrapper);
    ``epoch_batches()`` yields one epoch of ``(x, y)`` batches (in-memory slices via
    :func:`index_epochs`, or any ``DataLoader``); ``generator`` is handed to ``batch_fn``.
    ``on_epoch_end(epoch, model)`` returning True stops training early (early stopping on a
    validation split). Closes ``guard`` at the end.
    """
    params = guard.trainable() if guard else [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    total = cfg.epochs * steps_per_epoch
    sched = cosine_schedule(opt, cfg, total)
    scaler = grad_scaler(device, cfg.amp)
    write_back = guard is not None and moves_without_gradient(cfg)
    loss_fn = loss_fn or nn.functional.cross_entropy
    report = TrainReport(seconds=0.0, steps=0)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for epoch in range(cfg.epochs):
            if guard:
                guard.set_modes()
            else:
                forward.train()
            running, seen = 0.0, 0
            for xb, yb in epoch_batches():
                x = xb.to(device, non_blocking=True)
                target = yb.to(device, non_blocking=True)
                if batch_fn is not None:
                    x, target = batch_fn(x, target, generator)
                with autocast(device, cfg.amp):
                    logits = forward(x)
                loss = loss_fn(logits.float(), target)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if write_back:
                    guard.restore()
                if sched:
                    sched.step()
                running += float(loss.detach()) * len(yb)
                seen += len(yb)
                report.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running / seen:.3f}", epoch=epoch + 1)
            report.losses.append(running / max(seen, 1))
            if guard:
                # once per epoch, not per step: callbacks snapshot a model that is whole
                guard.restore()
                guard.restore_buffers()
            if on_epoch_end is not None and on_epoch_end(epoch, model) is True:
                break
    finally:
        bar.close()
        if guard:
            guard.close()
    model.eval()
    report.seconds = time.perf_counter() - t0
    return report


def fit(
    model: nn.Module,
    train,
    cfg: TrainConfig,
    *,
    mask: KeyMask | None = None,
    batch_fn: Callable | None = None,
    loss_fn: Callable | None = None,
    on_epoch_end: Callable[[int, nn.Module], bool | None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainReport:
    """Train ``model`` on ``train`` (an ImageSet); with ``mask``, only the key changes.

    batch_fn(x, y, generator) -> (x, target) rewrites a batch (e.g. token stamping);
    loss_fn(logits, target) defaults to cross-entropy, which accepts soft targets too.
    """
    if len(train) == 0:
        raise ConfigError("training set is empty")
    device = best_device(cfg.device)
    model.to(device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    return run_loop(
        model,
        cfg,
        forward=model,
        epoch_batches=index_epochs(train, lambda: _batches(len(train), cfg.batch_size, g)),
        steps_per_epoch=math.ceil(len(train) / cfg.batch_size),
        device=device,
        guard=KeyGuard(model, mask) if mask is not None else None,
        generator=g,
        batch_fn=batch_fn,
        loss_fn=loss_fn,
        on_epoch_end=on_epoch_end,
        desc=desc,
        progress=progress,
    )
