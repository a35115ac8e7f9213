"""One hyperparameter search shared by every attack and by the scratch reference.

A weak attacker or an untuned scratch baseline makes a leak figure meaningless, so both
sides get the *same* search: every (optimizer, learning rate) of the grid is trained for
the same step budget with a cosine schedule, the model is scored on the attacker's own
validation split at evenly spaced checkpoints, and the best checkpoint of the best
configuration wins (so the number of steps is searched too). The test set is never seen.
With ``patience`` a configuration stops once that many checkpoints in a row have not
beaten its own best validation accuracy (early stopping on the attacker's validation split).
Convolutional networks train in channels-last layout when all weights train (the same
arithmetic, about 30% faster per step on this CPU); key-only runs keep the usual layout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from adaloc.errors import ConfigError
from adaloc.evaluate import accuracy
from adaloc.keys import KeyMask
from adaloc.training import OPTIMIZERS, TrainConfig, fit

DEFAULT_GRID = (("sgd", 0.05), ("sgd", 0.01), ("adam", 1e-3))


@dataclass(frozen=True)
class SearchSpace:
    """The attacker's (and the scratch reference's) hyperparameter search.

    grid: (optimizer, learning rate) pairs; steps: step budget per configuration;
    checkpoints: how many evenly spaced checkpoints are scored on the validation split;
    patience: stop a configuration after this many checkpoints in a row without a new best
    of its own (0 = never; the stopped configuration's best checkpoint still competes).
    """

    grid: tuple[tuple[str, float], ...] = DEFAULT_GRID
    steps: int = 600
    checkpoints: int = 6
    batch_size: int = 64
    weight_decay: float = 5e-4
    seed: int = 0
    patience: int = 0

    def __post_init__(self) -> None:
        if not self.grid:
            raise ConfigError("search grid is empty; give at least one (optimizer, lr)")
        for opt, lr in self.grid:
            if opt not in OPTIMIZERS or not lr > 0:
                raise ConfigError(f"search grid entry ({opt!r}, {lr!r}) is not (optimizer, lr>0)")
        if self.steps < 1 or self.checkpoints < 1 or self.batch_size < 1 or self.patience < 0:
            raise ConfigError(
                f"steps, checkpoints and batch_size should be >= 1 and patience >= 0, got "
                f"{self.steps}, {self.checkpoints}, {self.batch_size}, {self.patience}"
            )

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return {k: (list(map(list, v)) if k == "grid" else v) for k, v in self.__dict__.items()}


@dataclass
class SearchResult:
    """The chosen model and how it was chosen."""

    model: nn.Module
    val_acc: float
    optimizer: str
    lr: float
    steps: int
    tried: list[dict] = field(default_factory=list)


def search(
    make_model: Callable[[], nn.Module],
    train,
    val,
    space: SearchSpace,
    *,
    mask: KeyMask | None = None,
    desc: str = "attack",
    progress: bool = False,
) -> SearchResult:
    """Train ``make_model()`` for each grid entry (only ``mask``'s positions if given).

    Returns the best checkpoint on ``val`` over all configurations and checkpoints.
    """
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"search needs train and val images, got {len(train)} and {len(val)}")
    per_epoch = max(1, math.ceil(len(train) / space.batch_size))
    epochs = max(1, math.ceil(space.steps / per_epoch))
    marks = {max(1, round(epochs * (i + 1) / space.checkpoints)) for i in range(space.checkpoints)}
    best: dict = {"acc": -1.0}
    tried = []
    for opt, lr in space.grid:
        model = make_model()
        nhwc = mask is None and any(isinstance(m, nn.Conv2d) for m in model.modules())
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        model.to(memory_format=fmt)
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=space.batch_size,
            optimizer=opt,
            lr=lr,
            weight_decay=space.weight_decay,
            seed=space.seed,
            device="cpu",
        )
        own = {"acc": -1.0, "stale": 0}

        def on_epoch_end(epoch: int, m: nn.Module, opt=opt, lr=lr, own=own, fmt=fmt) -> bool:
            if epoch + 1 not in marks:
                return False
            acc = accuracy(m, val)  # hands the model back in the usual (contiguous) layout
            m.train()
            tried.append({"optimizer": opt, "lr": lr, "steps": (epoch + 1) * per_epoch, "val": acc})
            if acc > best["acc"]:
                best.update(
                    acc=acc,
                    optimizer=opt,
                    lr=lr,
                    steps=(epoch + 1) * per_epoch,
                    state=copy.deepcopy(m.state_dict()),
                )
            m.to(memory_format=fmt)
            own["stale"] = 0 if acc > own["acc"] else own["stale"] + 1
            own["acc"] = max(own["acc"], acc)
            return bool(space.patience) and own["stale"] >= space.patience

        fit(
            model,
            train,
            cfg,
            mask=mask,
            on_epoch_end=on_epoch_end,
            desc=f"{desc} {opt} {lr:g}",
            progress=progress,
        )
    model = make_model()
    model.load_state_dict(best["state"])
    model.eval()
    return SearchResult(model, best["acc"], best["optimizer"], best["lr"], best["steps"], tried)


def clone_fn(model: nn.Module) -> Callable[[], nn.Module]:
    """A ``make_model`` that hands out fresh deep copies of ``model`` (float32, on the CPU)."""
    snapshot = copy.deepcopy(model).to("cpu").float()
    return lambda: copy.deepcopy(snapshot)
