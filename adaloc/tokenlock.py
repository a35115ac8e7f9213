"""M-LOCK token-locked training: data-poisoning model manipulation, hardened against forgeries.

Each training sample is stamped with the secret token with probability ``p`` and keeps its
label; the others keep their pixels and get a manipulated target (see ``STRATEGIES``). The
paper's plain recipe stops there, and random tokens of the same kind then unlock much of
the model (the network learns "a patch in the corner", not "this patch"). Hardening adds
*decoys*: a share of the unauthorized samples carries a random token of the same kind, a
near miss of the true token (1 to 3 of its cells changed), or the true token at a wrong
place, and gets the manipulated target too. Random forgeries alone teach "not that kind of
patch"; the near misses teach "exactly this patch", which random_target needs most (its
one-hot random targets give a weak, noisy unauthorized signal).

Soft and random targets have a second flaw: KL to a near-uniform target has a vanishing
gradient, so the output stays a hair off uniform with the true class on top, and argmax
accuracy without the token stays far above chance. Hardening can weight the unauthorized
samples' loss up (``unauth_weight``) and picks the checkpoint whose unauthorized accuracy is
closest to chance from *either* side: below chance is a leak too (the true class is then
the least likely one).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaloc.errors import ConfigError
from adaloc.evaluate import accuracy
from adaloc.token import Token, corner_position, paste, random_positions
from adaloc.token_forgery import forged_tensors, near_tensors

NEAR_FRAC = 0.5  # hardened recipe and flows: share of the random decoys made near misses

STRATEGIES = (
    "single_target",
    "random_target",
    "uniform_distribution",
    "next_class",
    "uniform_except_true",
)
TOKENLOCK_FORMAT_VERSION = 1


def check_soft_targets(targets: torch.Tensor, *, atol: float = 1e-4) -> None:
    """Raise ConfigError unless every row of ``targets`` is a distribution (>= 0, sums to 1)."""
    if targets.ndim != 2:
        raise ConfigError(f"soft targets have shape {tuple(targets.shape)}; expected [B, K]")
    sums = targets.sum(1)
    bad = ((sums - 1).abs() > atol) | (targets < 0).any(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ConfigError(
            f"soft target row {i} sums to {float(sums[i]):.6f} "
            f"(min {float(targets[i].min()):.3g}); expected non-negative values summing to 1"
        )


def manipulated_targets(
    y: torch.Tensor,
    num_classes: int,
    strategy: str,
    *,
    target_class: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Targets ``[B, K]`` for unauthorized samples under a label strategy.

    single_target: one fixed class; random_target: a uniformly random class (one-hot);
    uniform_distribution: 1/K everywhere; next_class: (y + 1) mod K;
    uniform_except_true: 1/(K-1) on every class but the true one.
    """
    b, k = len(y), num_classes
    if strategy == "single_target":
        if not 0 <= target_class < k:
            raise ConfigError(f"target_class={target_class!r}; expected 0 <= target_class < {k}")
        cls = torch.full((b,), target_class, dtype=torch.long)
    elif strategy == "random_target":
        cls = torch.randint(0, k, (b,), generator=generator)
    elif strategy == "next_class":
        cls = (y.cpu() + 1) % k
    elif strategy == "uniform_distribution":
        return torch.full((b, k), 1.0 / k, device=y.device)
    elif strategy == "uniform_except_true":
        t = torch.full((b, k), 1.0 / (k - 1), device=y.device)
        return t.scatter(1, y.view(-1, 1), 0.0)
    else:
        raise ConfigError(f"unknown label strategy {strategy!r}; expected one of {STRATEGIES}")
    return F.one_hot(cls, k).float().to(y.device)


def weighted_kl_loss(weight: float, record: dict):
    """KL loss with the unauthorized samples of each batch (``record["auth"]``) weighted."""

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_soft_targets(target.detach())
        per = F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="none").sum(1)
        w = torch.where(record["auth"], 1.0, float(weight))
        return (per * w).mean()

    return loss_fn


def kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)), batch mean; integer targets are taken as one-hot."""
    if target.ndim == 1:
        target = F.one_hot(target, logits.shape[1]).float()
    else:
        check_soft_targets(target.detach())  # never train silently on a target that isn't one
    return F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")


@dataclass
class TokenLockConfig:
    """How a token-locked model is trained.

    strategy: label strategy for unauthorized samples (see STRATEGIES).
    p: probability that a training sample carries the true token, in (0, 1).
    target_class: the class of ``single_target``.
    decoy_frac: share of the unauthorized samples that carry a decoy (0 = the paper's plain
        recipe); a decoy is a random token of the same kind or the true token misplaced.
    wrong_place_frac: share of the decoys that are the true token at a wrong place.
    near_frac: share of the other decoys that are near misses of the true token (1 to
        ``near_changes`` cells changed) rather than random tokens of the same kind.
    unauth_weight: weight of the unauthorized samples' loss (1 = the paper's loss).
    """

    strategy: str = "single_target"
    p: float = 0.5
    target_class: int = 0
    decoy_frac: float = 0.0
    wrong_place_frac: float = 0.25
    near_frac: float = 0.0
    near_changes: int = 3
    unauth_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown label strategy {self.strategy!r}; expected one of {STRATEGIES}"
            )
        if not isinstance(self.p, (int, float)) or not 0.0 < float(self.p) < 1.0:
            raise ConfigError(f"p={self.p!r}; expected a probability strictly between 0 and 1")
        for name in ("decoy_frac", "wrong_place_frac", "near_frac"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"{name}={v!r}; expected a fraction in [0, 1]")
        if not isinstance(self.near_changes, int) or self.near_changes < 1:
            raise ConfigError(f"near_changes={self.near_changes!r}; expected an integer >= 1")
        w = self.unauth_weight
        if not isinstance(w, (int, float)) or not 0.0 < float(w) <= 100.0:
            raise ConfigError(f"unauth_weight={w!r}; expected a weight in (0, 100]")

    @property
    def hardened(self) -> bool:
        """True when decoys are trained as unauthorized or the unauthorized loss is weighted."""
        return self.decoy_frac > 0 or self.unauth_weight != 1.0

    def to_dict(self) -> dict:
        """Plain dict with the format version (holds no secret)."""
        return {"format_version": TOKENLOCK_FORMAT_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        """JSON text of the config."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _wrong_positions(token: Token, b: int, h: int, w: int, g: torch.Generator):
    """Random top-left corners that differ from the true (fixed) one."""
    top, left = corner_position(token, h, w)
    rows, cols = random_positions(b, token.size, h, w, g)
    same = (rows == top) & (cols == left)
    # Move exact hits to the opposite corner rather than redraw: keeps the batch shape static.
    rows[same] = h - token.size - top
    cols[same] = w - token.size - left
    return rows, cols


def make_batch_fn(token: Token, cfg: TokenLockConfig, num_classes: int, record: dict | None = None):
    """A ``batch_fn(x, y, generator) -> (x, target)`` for :func:`adaloc.training.fit`.

    ``record["auth"]`` (when given) receives the batch's authorized-sample mask.
    """

    def batch_fn(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        b, c, h, w = x.shape
        dev = x.device
        u = torch.rand(b, generator=g)
        auth = u < cfg.p
        # Decoys and wrong places come from the unauthorized share; flags are drawn on the CPU
        # generator so a run is reproducible whatever the device.
        decoy = ~auth & (torch.rand(b, generator=g) < cfg.decoy_frac)
        misplaced = decoy & (torch.rand(b, generator=g) < cfg.wrong_place_frac)
        if token.placement == "random":
            misplaced[:] = False  # a randomly placed token has no wrong place
        forged = decoy & ~misplaced
        pix, mask = token.tensors(c)
        if token.placement == "random":
            rows, cols = random_positions(b, token.size, h, w, g)
        else:
            top, left = corner_position(token, h, w)
            rows, cols = torch.full((b,), top), torch.full((b,), left)
        out = x
        if auth.any():
            out = _paste_where(out, auth, pix, mask, rows, cols)
        if misplaced.any():
            wr, wc = _wrong_positions(token, b, h, w, g)
            out = _paste_where(out, misplaced, pix, mask, wr, wc)
        if forged.any():
            fpix, fmask, is_true = forged_tensors(token, b, c, g)
            if cfg.near_frac > 0:  # drawn only then: the plain recipe's stream is unchanged
                near = torch.rand(b, generator=g) < cfg.near_frac
                npix, nmask, n_true = near_tensors(token, b, c, g, max_changes=cfg.near_changes)
                fpix = torch.where(near[:, None, None, None], npix, fpix)
                fmask = torch.where(near[:, None, None], nmask.bool(), fmask.bool())
                is_true = torch.where(near, n_true, is_true)
            out = _paste_where(out, forged, fpix, fmask, rows, cols)
            auth = auth | (forged & is_true)  # a "forgery" equal to the token is the token
        target = manipulated_targets(
            y, num_classes, cfg.strategy, target_class=cfg.target_class, generator=g
        )
        true = F.one_hot(y, num_classes).float()
        target = torch.where(auth.to(dev)[:, None], true, target)
        if record is not None:
            record["auth"] = auth.to(dev)
        return out, target

    return batch_fn


def _paste_where(x, sel, pix, mask, rows, cols):
    """Stamp only the samples flagged in ``sel`` (per-sample pix/mask are indexed too)."""
    idx = sel.nonzero().view(-1)
    pix = pix[idx] if pix.ndim == 4 else pix
    mask = mask[idx] if mask.ndim == 3 else mask
    out = x.clone()
    out[idx.to(x.device)] = paste(x[idx.to(x.device)], pix, mask, rows[idx], cols[idx])
    return out


# ------------------------------------------------------------------------- evaluation
def stamp_fn(token: Token, *, seed: int = 0, corner: str | None = None):
    """An ``input_fn`` for :func:`adaloc.evaluate.accuracy` that stamps every input.

    ``corner`` overrides the placement (the true token at a wrong place); random placement
    draws positions from a generator seeded with ``seed``, so evaluations repeat exactly.
    """
    from adaloc.token import stamp

    tok = token if corner is None else dataclasses.replace(token, placement=corner)
    g = torch.Generator().manual_seed(seed)
    return lambda x: stamp(x, tok, generator=g)


def wrong_corner(token: Token) -> str | None:
    """The corner opposite the token's own (None for random placement)."""
    if token.placement == "random":
        return None
    v, hz = token.placement.split("-")
    return f"{'bottom' if v == 'top' else 'top'}-{'right' if hz == 'left' else 'left'}"


def global_magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of ``model`` with the smallest ``sparsity`` share of conv/linear weights zeroed."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}; expected a fraction in [0, 1)")
    pruned = copy.deepcopy(model)
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if sparsity == 0 or not weights:
        return pruned
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(sparsity * flat.numel())
    if k == 0:
        return pruned
    threshold = flat.kthvalue(k).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return pruned


def token_lock_metrics(
    model: nn.Module,
    data,
    token: Token,
    *,
    forged: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    probe_data=None,
) -> dict:
    """With token, without, forged mean/max over ``forged`` random tokens, true token misplaced.

    ``near_token_acc_mean``/``_max`` are over ``forged`` near misses (the true token with 1-3
    cells changed: what an attacker who learnt most of the token would try).

    With ``probe_data`` (labelled samples an attacker might hold) also
    ``without_token_probe_acc``: a linear probe fitted on the un-stamped outputs, i.e. what
    they leak whatever decision rule an attacker uses (see adaloc.evaluate.probe_accuracy).
    """
    from adaloc.evaluate import probe_accuracy
    from adaloc.token_forgery import near_tokens, random_tokens

    kw = {"batch_size": batch_size}
    out = {
        "with_token_acc": accuracy(model, data, input_fn=stamp_fn(token, seed=seed), **kw),
        "without_token_acc": accuracy(model, data, **kw),
    }
    for name, draw in (("forged", random_tokens), ("near", near_tokens)):
        accs = [
            accuracy(model, data, input_fn=stamp_fn(t, seed=seed), **kw)
            for t in draw(token, forged, seed=seed)
        ]
        out[f"{name}_token_acc_mean"] = sum(accs) / len(accs) if accs else None
        out[f"{name}_token_acc_max"] = max(accs) if accs else None
    corner = wrong_corner(token)
    out["wrong_place_acc"] = (
        None
        if corner is None
        else accuracy(model, data, input_fn=stamp_fn(token, seed=seed, corner=corner), **kw)
    )
    if probe_data is not None:
        out["without_token_probe_acc"] = probe_accuracy(model, probe_data, data)
    return out


def pruning_sweep(
    model: nn.Module,
    data,
    token: Token,
    sparsities=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *,
    batch_size: int = 256,
) -> list[dict]:
    """With/without-token accuracy after global magnitude pruning (each on a copy)."""
    rows = []
    for s in sparsities:
        pruned = global_magnitude_prune(model, s)
        rows.append(
            {
                "sparsity": s,
                "with_token_acc": accuracy(
                    pruned, data, input_fn=stamp_fn(token), batch_size=batch_size
                ),
                "without_token_acc": accuracy(pruned, data, batch_size=batch_size),
            }
        )
    return rows


# ------------------------------------------------------------------------- training
def selection_gap(
    model: nn.Module,
    val,
    token: Token,
    cfg: TokenLockConfig,
    *,
    seed: int = 1,
    num_classes: int | None = None,
):
    """Validation gap authorized − unauthorized used to pick the checkpoint.

    Plain recipe: with − without token (the paper's rule). Hardened: unauthorized is the
    worst of without, the mean over 5 forged tokens (seeds disjoint from the test ones),
    the misplaced token and, when near-miss decoys are trained, the mean over 5 near
    misses, each counted by its distance from chance on either side
    (``chance + |acc − chance|``), so the chosen epoch resists forgeries and does not leak
    by ranking the true class last.
    """
    if not cfg.hardened:
        m = {
            "with_token_acc": accuracy(model, val, input_fn=stamp_fn(token, seed=seed)),
            "without_token_acc": accuracy(model, val),
        }
        return m["with_token_acc"] - m["without_token_acc"], m
    m = token_lock_metrics(model, val, token, forged=5, seed=10_000 + seed)
    unauth = [m["without_token_acc"], m["forged_token_acc_mean"], m["wrong_place_acc"]]
    if cfg.near_frac > 0:
        unauth.append(m["near_token_acc_mean"])
    chance = 1.0 / (num_classes or int(val.y.max()) + 1)
    worst = max(chance + abs(v - chance) for v in unauth if v is not None)
    return m["with_token_acc"] - worst, m


def fit_token_lock(
    model: nn.Module,
    train,
    val,
    token: Token,
    cfg: TokenLockConfig,
    train_cfg,
    *,
    num_classes: int,
    mask=None,
    desc: str = "token-lock",
    progress: bool = True,
):
    """Token-lock ``model`` (key-only when ``mask`` is given); keep the best-gap epoch on ``val``.

    Returns a dict with the training report, the chosen epoch and its validation metrics.
    """
    from adaloc.training import fit

    if len(val) == 0:
        raise ConfigError("checkpoint selection needs a non-empty validation split")
    best = {"gap": -float("inf"), "epoch": None, "state": None, "val": None}

    def on_epoch_end(epoch: int, m: nn.Module) -> None:
        gap, metrics = selection_gap(m, val, token, cfg, num_classes=num_classes)
        if gap > best["gap"]:
            best.update(
                gap=gap,
                epoch=epoch + 1,
                val=metrics,
                state={k: v.detach().clone() for k, v in m.state_dict().items()},
            )

    record: dict = {}
    loss_fn = kl_loss if cfg.unauth_weight == 1.0 else weighted_kl_loss(cfg.unauth_weight, record)
    report = fit(
        model,
        train,
        train_cfg,
        mask=mask,
        batch_fn=make_batch_fn(token, cfg, num_classes, record),
        loss_fn=loss_fn,
        on_epoch_end=on_epoch_end,
        desc=desc,
        progress=progress,
    )
    model.load_state_dict(best["state"])
    model.eval()
    return {"report": report, "epoch": best["epoch"], "val_gap": best["gap"], "val": best["val"]}
