"""Prefect task: the fast attack subset that prices every key version for auditors.

An attacker holding the published base and 1% / 5% of the training images refills the
key positions it infers and fine-tunes (all weights, or only the inferred positions); the
reference is a fresh network trained on the same images with the same search. The leak
(best attack - scratch, in points) and, with a token, whether a token search unlocks the
model are logged as MLflow metrics on the version's run. Full figures: bench/attacks.py.
"""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.config import PipelineConfig
from pipelines.lock_tasks import lock_fill

LOCAL = {"cache_policy": NO_CACHE, "persist_result": False}
FRACTIONS = {"1pct": 0.01, "5pct": 0.05}
FAST_ATTACKS = ("refill_all", "refill_positions")
FAST_STEPS = 20  # per search: seconds on the tiny test configs, a cheap audit elsewhere
TOKEN_BUDGET = 64  # tries of 32 images each; bench/attacks.py runs the full search


def fast_space(seed: int):
    """The audit's search space: one Adam configuration, few steps, two checkpoints."""
    from adaloc.attacks import SearchSpace

    return SearchSpace(grid=(("adam", 1e-3),), steps=FAST_STEPS, checkpoints=2, seed=seed)


@task(name="attack subset", task_run_name="attack subset v{version}", **LOCAL)
def attack_metrics(base, key, bundle, cfg: PipelineConfig, version: int, token=None) -> dict:
    """``attack_leak_pt_1pct``, ``attack_leak_pt_5pct`` (and ``token_search_success``).

    The weight attacks get the base only (never the key or its mask); the token search
    queries the authorized model (base + key), as a client without the token would.
    """
    import torch

    from adaloc.attacks import (
        attacker_donor,
        attacker_split,
        fresh_fn,
        scratch,
        shadow_detector,
        token_search,
        weight_attacks,
    )
    from adaloc.evaluate import accuracy
    from adaloc.lock import unlock
    from adaloc.models import build_model
    from adaloc.tokenlock import stamp_fn

    torch.manual_seed(cfg.seed)

    def make():
        return build_model(
            cfg.model,
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            image_size=bundle.image_size,
        )

    spec, space, test = cfg.key_spec(), fast_space(cfg.seed + version), bundle.test
    fill = lock_fill(make(), token)
    out: dict = {}
    data = None
    for label, frac in FRACTIONS.items():
        n = min(len(bundle.train), max(10, round(frac * len(bundle.train))))
        data = attacker_split(bundle.train, n, seed=cfg.seed + version)
        ref = scratch(fresh_fn(make, cfg.seed + 1), data, space)
        # the lock flow's fill for this model (the attacker knows the recipe); a decoy
        # fill's donor for each shadow: a network it trains on its own images
        det = shadow_detector(
            [ref.model],
            base,
            spec,
            fill,
            data,
            fresh_fn(make, 2),
            make_donor=functools.partial(attacker_donor, make, data, cfg.seed, epochs=20),
        )
        got = weight_attacks(
            base,
            spec,
            fresh_fn(make, cfg.seed + 1),
            data,
            space,
            detector=det,
            attacks=FAST_ATTACKS,
        )
        best = max(accuracy(r.model, test) for r in got.values())
        out[f"attack_leak_pt_{label}"] = 100 * (best - accuracy(ref.model, test))
    if token is not None and data is not None:
        served = unlock(base, key)
        found = token_search(
            served, data.train, token, budget=TOKEN_BUDGET, screen=32, seed=cfg.seed
        )
        acc = accuracy(served, test, input_fn=stamp_fn(found.best))
        out["token_search_success"] = float(acc > 1.0 / bundle.num_classes + 0.05)
        out["token_search_tries"] = float(found.tries)
    return out
