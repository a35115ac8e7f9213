"""Attacks on a stolen base by someone holding N labelled images, and the scratch reference.

Every attack gets what an attacker has: the published base (never the mask), the key spec
from the model card, a way to build a fresh network of the same architecture (the card's
builder), and its own images split into train/validation. Each returns the attacked model
and what it learnt (its chosen hyperparameters, its inferred key positions).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adaloc.attacks.positions import fit_detector, infer_positions
from adaloc.attacks.tuning import SearchResult, SearchSpace, clone_fn, search
from adaloc.errors import ConfigError
from adaloc.keys import KeyMask, KeySpec, rows_view, select_key
from adaloc.keys import _forced_names as _forced
from adaloc.lock import DONOR_FILLS, decoy_donor, lock
from adaloc.training import TrainConfig, fit

WEIGHT_ATTACKS = ("finetune", "refill_all", "refill_positions", "refill_positions_then_all")


@dataclass
class AttackerData:
    """The attacker's labelled images: its own train and validation splits."""

    train: object
    val: object

    @property
    def n(self) -> int:
        """Number of labelled images the attacker holds."""
        return len(self.train) + len(self.val)


def attacker_split(pool, n: int, *, val_fraction: float = 0.2, seed: int = 0) -> AttackerData:
    """Draw ``n`` labelled images from ``pool`` and split them into train/val (seeded).

    Every class present in the draw keeps at least one training image when it can.
    """
    if not 2 <= n <= len(pool):
        raise ConfigError(f"attacker needs 2 <= n <= {len(pool)} images, got n={n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=g)[:n]
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return AttackerData(pool.subset(idx[n_val:]), pool.subset(idx[:n_val]))


@dataclass
class AttackResult:
    """An attacked model, how it was tuned, and the positions it attacked (if any)."""

    name: str
    model: nn.Module
    search: SearchResult
    positions: KeyMask | None = None

    @property
    def val_acc(self) -> float:
        """Accuracy on the attacker's validation split (what the attacker chooses by)."""
        return self.search.val_acc


def fresh_fn(builder: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """A ``make_model`` for freshly initialised networks (the card's builder, seeded)."""

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return builder()

    return make


@torch.no_grad()
def refill(base: nn.Module, positions: KeyMask, fresh: nn.Module) -> nn.Module:
    """A copy of ``base`` whose ``positions`` hold ``fresh``'s (initial) values."""
    out = copy.deepcopy(base)
    state, new = out.state_dict(), fresh.state_dict()
    for name, idx in positions.indices.items():
        rows = rows_view(state[name], positions.granularity)
        rows[idx] = rows_view(new[name], positions.granularity)[idx].to(rows.dtype)
    return out


def shadow_detector(
    shadows,
    base: nn.Module,
    spec: KeySpec,
    fill: str,
    data: AttackerData,
    make_fresh,
    *,
    seed=1,
    harden=None,
    make_donor=None,
    features="cv",
):
    """Learn to spot filled rows: lock models the attacker has with the public recipe.

    ``harden(model, mask, train) -> model``: the recipe's hardening between key selection
    and locking, which the attacker applies to its shadows too (Kerckhoffs).
    ``make_donor(k) -> model``: for a donor fill ("decoy"), the second network the attacker
    trains for shadow ``k``; hardened (if the recipe hardens) with ``decoy_mask``, as the
    owner's is. ``features``: which row statistics the detector uses
    (:func:`~adaloc.attacks.positions.fit_detector`; "cv": chosen on the shadows
    themselves, leave one out).

    ``shadows``: networks of the same architecture the attacker trained itself (e.g. its
    scratch model). The stolen ``base`` is re-locked too (its card-disclosed tensors
    refilled first): its real rows have exactly the statistics the detector must judge.
    """
    pairs = []
    state = base.state_dict()
    forced = KeyMask(
        {
            n: torch.arange(rows_view(state[n], spec.granularity).shape[0])
            for n in _forced(base, spec)
        },
        spec.granularity,
    )
    for k, model in enumerate([*shadows, refill(base, forced, make_fresh())]):
        model = copy.deepcopy(model).to("cpu")
        mask = select_key(model, spec, data=data.train)
        if harden is not None:
            model = harden(model, mask, data.train)
        donor = None
        if fill in DONOR_FILLS:
            if make_donor is None:
                raise ValueError(f"fill {fill!r} needs make_donor=")
            donor = decoy_donor(make_donor(k), mask, model, data.train, harden, seed=seed + k)
        locked, _ = lock(model, mask, fill=fill, seed=seed + k, donor=donor)
        pairs.append((locked, mask))
    return fit_detector(pairs, spec, features=features)


def attacker_donor(make_fresh, data: AttackerData, seed: int, k: int, *, epochs: int = 40):
    """A decoy donor for the attacker's shadow ``k`` (``shadow_detector(make_donor=)``): a
    fresh network trained on its own images (SGD lr 0.05, seeded by ``seed + 70 + k``)."""
    net = fresh_fn(make_fresh, seed + 70 + k)()
    cfg = TrainConfig(epochs=epochs, lr=0.05, seed=seed + 70 + k, device="cpu")
    fit(net, data.train, cfg, progress=False)
    return net


def scratch(make_fresh, data: AttackerData, space: SearchSpace, **kw) -> AttackResult:
    """The reference: a fresh network trained on the attacker's images, same search."""
    return AttackResult("scratch", *_searched(make_fresh, data, space, desc="scratch", **kw))


def _searched(make, data: AttackerData, space: SearchSpace, *, mask=None, desc="", **kw):
    res = search(make, data.train, data.val, space, mask=mask, desc=desc, **kw)
    return res.model, res


def weight_attacks(
    base: nn.Module,
    spec: KeySpec,
    make_fresh: Callable[[], nn.Module],
    data: AttackerData,
    space: SearchSpace,
    *,
    detector=None,
    positions: KeyMask | None = None,
    attacks: tuple[str, ...] = WEIGHT_ATTACKS,
    progress: bool = False,
) -> dict[str, AttackResult]:
    """Run the weight attacks on ``base``; returns ``{attack name: AttackResult}``.

    finetune: all weights of the base as published. refill_*: infer the key positions
    (``detector`` from :func:`shadow_detector`; constancy alone without it), re-initialise
    them from a fresh network, then train (a) all weights, (b) only the inferred positions,
    (c) the positions first, then all weights (both stages searched). ``positions``: the
    inferred positions computed once beforehand (``infer_positions(base, spec, detector)``;
    the bench shares them between the attacks it runs in parallel).
    """
    unknown = set(attacks) - set(WEIGHT_ATTACKS)
    if unknown:
        raise ConfigError(f"unknown attack(s) {sorted(unknown)}; expected {WEIGHT_ATTACKS}")
    out: dict[str, AttackResult] = {}
    kw = {"progress": progress}
    if "finetune" in attacks:
        out["finetune"] = AttackResult(
            "finetune", *_searched(clone_fn(base), data, space, desc="finetune", **kw)
        )
    if not set(attacks) & set(WEIGHT_ATTACKS[1:]):
        return out
    inferred = positions if positions is not None else infer_positions(base, spec, detector)
    refilled = refill(base, inferred, make_fresh())
    if "refill_all" in attacks:
        m, r = _searched(clone_fn(refilled), data, space, desc="refill all", **kw)
        out["refill_all"] = AttackResult("refill_all", m, r, inferred)
    if {"refill_positions", "refill_positions_then_all"} & set(attacks):
        m, r = _searched(
            clone_fn(refilled), data, space, mask=inferred, desc="refill positions", **kw
        )
        out["refill_positions"] = AttackResult("refill_positions", m, r, inferred)
        if "refill_positions_then_all" in attacks:
            m2, r2 = _searched(clone_fn(m), data, space, desc="positions then all", **kw)
            out["refill_positions_then_all"] = AttackResult(
                "refill_positions_then_all", m2, r2, inferred
            )
    return out
