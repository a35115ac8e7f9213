"""The key-only update recipe: adapt a key to a new stage of data, choosing its own budget.

One set of defaults (:class:`UpdateRecipe`) serves ``bench/lifecycle.py`` and the pipelines'
update flow. What it does, in order (each step measured in ``bench/README.md``):

1. **BatchNorm statistics re-estimated on the new data** (AdaBN): keyed running statistics are
   reset and recomputed as a cumulative average over the stage's training images. Under a
   shift this alone recovers much of the accuracy, at the cost of one forward pass. The
   parent's statistics stay a candidate: statistics re-estimated from a few dozen images
   are noisy (13 points lost in-distribution on digits at 22 images), so val decides, and
   the parent's start wins ties.
2. **A polarity candidate** (with 1.): a copy whose first BatchNorm scale is negated, then
   re-estimated, is scored on val next to the plain start and the better one is trained.
   With a bias-free stem, conv(1 - x) = conv(1) - conv(x): an input inversion is undone by
   that sign flip up to the zero-padded border, a point key-only gradient steps reach
   slowly (a scale must cross zero). On any other stage the candidate loses on val.
3. **Adam on the few-parameter key**: per-parameter step sizes move a norm scale across zero
   in tens of steps where SGD at the base's rate needs hundreds.
4. **A step budget chosen on the stage's validation split**: at least ``min_steps`` optimizer
   steps (small update sets get more epochs, large ones keep the caller's), at most
   ``max_epochs``; the state with the best validation accuracy (ties: lower validation loss,
   which a few dozen val images need) is kept (the starting point counts, so an update never
   scores below its starting point on val) and training stops after ``patience_steps``
   steps (at least one epoch) without gain.

The same routine with ``mask=None`` is the full fine-tuning reference (all parameters, the
caller's optimizer), so both get the same data, statistics warm start and budget rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from adaloc.data import ImageSet
from adaloc.errors import ConfigError
from adaloc.evaluate import logits
from adaloc.keys import KeyMask
from adaloc.training import OPTIMIZERS, TrainConfig, TrainReport, fit


@dataclass(frozen=True)
class UpdateRecipe:
    """Defaults of a key-only update (the flows and the lifecycle bench use these)."""

    optimizer: str = "adam"
    lr: float = 0.01
    weight_decay: float = 0.0
    min_steps: int = 300
    max_epochs: int = 60
    patience_steps: int = 100
    recalibrate_bn: bool = True
    polarity_candidate: bool = True
    batch_size: int = 64
    # leave the start only for a val accuracy gain of this many standard errors of the
    # start's val accuracy (0: any gain, ties broken by val loss); see bench/README.md
    start_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown; use one of {OPTIMIZERS}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(
                f"lr should be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}"
            )
        counts = (self.min_steps, self.max_epochs, self.patience_steps, self.batch_size)
        if self.min_steps < 0 or min(counts[1:]) < 1 or self.start_margin < 0:
            raise ConfigError(
                "min_steps >= 0, start_margin >= 0 and max_epochs, patience_steps, batch_size "
                f">= 1 expected; got {counts} and start_margin {self.start_margin}"
            )

    def to_dict(self) -> dict:
        """Plain dict, for logging."""
        return asdict(self)

    def train_config(self, *, epochs: int, seed: int = 0, device: str = "auto") -> TrainConfig:
        """The TrainConfig of a key-only update with this recipe's optimizer."""
        return TrainConfig(
            epochs=epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=seed,
            device=device,
        )


@dataclass
class UpdateReport:
    """What an update did: the budget it chose and the validation accuracy it kept."""

    seconds: float
    steps: int
    epochs_planned: int
    epochs_run: int
    best_epoch: int  # 0 = the starting point (after statistics re-estimation) was best
    val_start: float | None
    val_best: float | None
    start: str = "parent"  # parent statistics | reestimated | flipped (polarity candidate)
    kept_start: bool = False  # the best epoch's val gain was under the recipe's start_margin

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


def _keyed_batchnorms(model: nn.Module, mask: KeyMask | None) -> list[nn.Module]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            prefix = f"{name}." if name else ""
            if mask is None or prefix + "running_mean" in mask.indices:
                out.append(module)
    return out


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, data: ImageSet, mask: KeyMask | None = None, *, batch_size: int = 256
) -> int:
    """Re-estimate keyed BatchNorm statistics on ``data`` (cumulative mean over all images).

    Only BatchNorm layers whose statistics lie in ``mask`` (all of them when ``mask`` is
    None) change; every other value of ``model`` stays bit-identical (the step counters of
    the re-estimated layers are written back too). Returns how many layers were re-estimated.
    """
    bns = _keyed_batchnorms(model, mask)
    if not bns or len(data) < 2:
        return 0
    counters = {id(m): m.num_batches_tracked.clone() for m in bns}
    momenta = {id(m): m.momentum for m in bns}
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every image weighs the same
            m.train()
        for start in range(0, len(data), batch_size):
            x = data.x[start : start + batch_size]
            if len(x) > 1:
                model(x.to(device))
    finally:
        for m in bns:
            m.momentum = momenta[id(m)]
            m.num_batches_tracked.copy_(counters[id(m)])
        model.train(was_training)
    return len(bns)


def _first_batchnorm(model: nn.Module, mask: KeyMask | None) -> nn.Module | None:
    """The first BatchNorm in module order, if its scale and statistics are all in the key."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if mask is None:
                return module
            prefix = f"{name}." if name else ""
            scale = mask.indices.get(prefix + "weight")
            whole = scale is not None and len(scale) == module.num_features
            return module if whole and prefix + "running_mean" in mask.indices else None
    return None


def _tracked_names(model: nn.Module, mask: KeyMask | None) -> list[str]:
    names = list(model.state_dict())
    return names if mask is None else [n for n in names if n in mask.indices]


def _score(model: nn.Module, val: ImageSet) -> tuple[float, float]:
    """(accuracy, -mean loss) on ``val``: compared as a tuple, loss breaks accuracy ties."""
    z = logits(model, val)
    loss = float(nn.functional.cross_entropy(z, val.y))
    return float((z.argmax(1) == val.y).float().mean()), -loss


def _load(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for n, t in values.items():
            state[n].copy_(t)


def _try_polarity(model, first, train, val, mask, snapshot) -> bool:
    """Keep the first-BatchNorm-negated start if it scores better on val (see module doc)."""
    plain, plain_score = snapshot(), _score(model, val)
    with torch.no_grad():
        first.weight.neg_()
    recalibrate_batchnorm(model, train, mask)
    if _score(model, val) > plain_score:
        return True
    _load(model, plain)
    return False


def _below_margin(best: tuple, start: tuple, n_val: int, margin: float) -> bool:
    """Whether the val accuracy gain best - start is under ``margin`` standard errors."""
    p = min(max(start[0], 0.5 / n_val), 1 - 0.5 / n_val)  # no zero spread at 0% or 100%
    return best[0] - start[0] < margin * math.sqrt(p * (1 - p) / n_val)


def planned_epochs(recipe: UpdateRecipe, n_train: int, epochs: int) -> int:
    """The caller's epochs, raised until at least ``min_steps`` steps, capped at max_epochs."""
    steps_per_epoch = max(1, math.ceil(n_train / recipe.batch_size))
    need = math.ceil(recipe.min_steps / steps_per_epoch)
    return max(1, min(recipe.max_epochs, max(epochs, need)))


def adapt(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    *,
    mask: KeyMask | None,
    recipe: UpdateRecipe | None = None,
    cfg: TrainConfig | None = None,
    epochs: int = 2,
    seed: int = 0,
    device: str = "auto",
    desc: str = "update",
    progress: bool = True,
) -> UpdateReport:
    """Update ``model`` on a new stage in place: key-only with ``mask``, else all parameters.

    ``recipe`` (default :class:`UpdateRecipe`) sets the budget rule and statistics warm
    start; ``cfg`` overrides the optimizer settings (the full fine-tuning reference passes
    the base's SGD settings), else the recipe's optimizer is used. ``epochs`` is the
    caller's floor. With an empty ``val`` the planned budget runs to its end.
    """
    recipe = recipe or UpdateRecipe()
    if len(train) == 0:
        raise ConfigError("update stage has no training images")
    n_epochs = planned_epochs(recipe, len(train), epochs)
    if cfg is None:
        cfg = recipe.train_config(epochs=n_epochs, seed=seed, device=device)
    else:
        cfg = dataclasses.replace(cfg, epochs=n_epochs, batch_size=recipe.batch_size, seed=seed)
    has_val = val is not None and len(val) > 0
    names = _tracked_names(model, mask)

    def snapshot() -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {n: state[n].detach().clone() for n in names}

    origin = "parent"
    if recipe.recalibrate_bn:
        parent = snapshot()
        parent_score = _score(model, val) if has_val else None
        recalibrate_batchnorm(model, train, mask)
        origin = "reestimated"
        first = _first_batchnorm(model, mask) if recipe.polarity_candidate and has_val else None
        if first is not None and first.affine:
            flip = _try_polarity(model, first, train, val, mask, snapshot)
            origin = "flipped" if flip else origin
        if has_val and parent_score >= _score(model, val):
            _load(model, parent)
            origin = "parent"

    steps_per_epoch = max(1, math.ceil(len(train) / recipe.batch_size))
    patience = max(1, math.ceil(recipe.patience_steps / steps_per_epoch))
    start = _score(model, val) if has_val else None
    start_state = snapshot() if has_val else None
    best = {"score": start, "epoch": 0, "state": start_state, "run": 0}

    def on_epoch_end(epoch: int, m: nn.Module) -> bool:
        best["run"] = epoch + 1
        if not has_val:
            return False
        score = _score(m, val)
        if score > best["score"]:
            best.update(score=score, epoch=epoch + 1, state=snapshot())
        return epoch + 1 - best["epoch"] >= patience

    rep: TrainReport = fit(
        model, train, cfg, mask=mask, on_epoch_end=on_epoch_end, desc=desc, progress=progress
    )
    kept_start = (
        has_val
        and best["epoch"] > 0
        and _below_margin(best["score"], start, len(val), recipe.start_margin)
    )
    if kept_start:
        # a gain within the val split's noise: the start is the safer choice
        best.update(score=start, epoch=0, state=start_state)
    if has_val and best["epoch"] != best["run"]:
        # load the best epoch's values (key tensors only when key-only: the rest never moved)
        _load(model, best["state"])
    model.to("cpu").eval()
    return UpdateReport(
        seconds=rep.seconds,
        steps=rep.steps,
        epochs_planned=n_epochs,
        epochs_run=best["run"],
        best_epoch=best["epoch"],
        val_start=start[0] if has_val else None,
        val_best=best["score"][0] if has_val else None,
        start=origin,
        kept_start=kept_start,
    )
