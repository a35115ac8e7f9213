"""Attacks on a stolen base: position inference, refill, the shared search, token search."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from adaloc.attacks import (
    FEATURES,
    SearchSpace,
    attacker_split,
    fit_detector,
    fresh_fn,
    infer_positions,
    position_report,
    refill,
    scratch,
    search,
    select_features,
    shadow_detector,
    space_bits,
    token_search,
    weight_attacks,
)
from adaloc.errors import ConfigError, TokenError
from adaloc.evaluate import accuracy
from adaloc.keys import KeySpec, rows_view, select_key
from adaloc.lock import lock, outside_key_sha256
from adaloc.token import Token
from adaloc.tokenlock import TokenLockConfig, fit_token_lock, stamp_fn
from adaloc.training import TrainConfig
from tests.adaloc.conftest import tiny_net

SPEC = KeySpec(budget=0.1)
FAST = SearchSpace(grid=(("adam", 3e-3), ("sgd", 0.05)), steps=40, checkpoints=2)


def test_zero_fill_gives_the_positions_away(trained_tiny):
    mask = select_key(trained_tiny, SPEC)
    base, _ = lock(trained_tiny, mask, fill="zeros")
    rep = position_report(trained_tiny, SPEC, infer_positions(base, SPEC), mask)
    assert rep.precision == 1.0 and rep.recall == 1.0 and rep.share < 0.2


def test_matched_fill_leaves_no_constant_rows(trained_tiny):
    mask = select_key(trained_tiny, SPEC)
    base, _ = lock(trained_tiny, mask, fill="matched")
    state = base.state_dict()
    for name, idx in mask.indices.items():
        rows = rows_view(state[name], "row")
        if rows.shape[1] > 1 and idx.numel() < rows.shape[0]:  # a partly keyed weight tensor
            assert bool((rows[idx].std(1) > 0).all()), name
    # constancy alone now finds no more than a blind guess of the same size would
    rep = position_report(trained_tiny, SPEC, infer_positions(base, SPEC), mask)
    assert rep.recall <= max(2 * rep.share, 0.25)


def test_the_attacker_picks_its_detector_features_on_its_own_shadows(trained_tiny):
    # zero fill: constancy (or the vanishing norm) alone finds every filled row; the
    # leave-one-shadow-out choice keeps a small subset and still finds them all
    pairs = []
    for k in range(3):
        torch.manual_seed(10 + k)
        shadow = tiny_net()
        shadow_mask = select_key(shadow, SPEC)
        pairs.append((lock(shadow, shadow_mask, fill="zeros", seed=k)[0], shadow_mask))
    keep = select_features(pairs, SPEC)
    chosen = {f for f, k in zip(FEATURES, keep.tolist(), strict=True) if k}
    assert chosen & {"const", "norm"} and len(chosen) < len(FEATURES)
    mask = select_key(trained_tiny, SPEC)
    base, _ = lock(trained_tiny, mask, fill="zeros")
    det = fit_detector(pairs, SPEC, features="cv")
    assert bool((det[0][keep == 0] == 0).all())  # a dropped feature has no weight
    assert position_report(trained_tiny, SPEC, infer_positions(base, SPEC, det), mask).recall == 1
    assert bool((select_features(pairs[:1], SPEC) == 1).all())  # nothing to validate on
    with pytest.raises(ValueError, match="features"):
        fit_detector(pairs, SPEC, features="best")


def test_refill_writes_fresh_values_only_at_the_positions(trained_tiny):
    mask = select_key(trained_tiny, SPEC)
    fresh = tiny_net()
    out = refill(trained_tiny, mask, fresh)
    assert outside_key_sha256(out, mask) == outside_key_sha256(trained_tiny, mask)
    for name, idx in mask.indices.items():
        got = rows_view(out.state_dict()[name], "row")[idx]
        assert torch.equal(got, rows_view(fresh.state_dict()[name], "row")[idx])


def test_search_picks_on_validation_and_returns_that_model(tiny_data):
    data = attacker_split(tiny_data, 200, seed=0)
    res = search(tiny_net, data.train, data.val, FAST)
    assert res.val_acc == pytest.approx(accuracy(res.model, data.val))
    assert res.val_acc == max(t["val"] for t in res.tried)
    assert len(res.tried) == len(FAST.grid) * FAST.checkpoints
    with pytest.raises(ConfigError, match="grid entry"):
        SearchSpace(grid=(("rmsprop", 0.1),))


def test_patience_stops_a_configuration_that_stopped_improving(tiny_data):
    data = attacker_split(tiny_data, 200, seed=0)
    # lr 1e-9: the validation accuracy cannot move, so every checkpoint after the first is stale
    flat = SearchSpace(grid=(("sgd", 1e-9), ("adam", 1e-9)), steps=40, checkpoints=4, patience=1)
    res = search(tiny_net, data.train, data.val, flat)
    assert [t["optimizer"] for t in res.tried] == ["sgd", "sgd", "adam", "adam"]
    assert res.val_acc == max(t["val"] for t in res.tried)
    full = search(tiny_net, data.train, data.val, dataclasses.replace(flat, patience=0))
    assert len(full.tried) == 8
    # a configuration that keeps improving is not cut short
    live = search(tiny_net, data.train, data.val, dataclasses.replace(FAST, patience=1))
    assert len(live.tried) >= len(FAST.grid)
    with pytest.raises(ConfigError, match="patience"):
        SearchSpace(patience=-1)


def test_weight_attacks_run_and_positions_only_training_stays_in_place(trained_tiny, tiny_data):
    mask = select_key(trained_tiny, SPEC)
    base, _ = lock(trained_tiny, mask, fill="zeros")
    data = attacker_split(tiny_data, 120, seed=1)
    ref = scratch(fresh_fn(tiny_net, 3), data, FAST)
    det = shadow_detector([ref.model], base, SPEC, "zeros", data, fresh_fn(tiny_net, 4))
    got = weight_attacks(base, SPEC, fresh_fn(tiny_net, 3), data, FAST, detector=det)
    assert set(got) == {"finetune", "refill_all", "refill_positions", "refill_positions_then_all"}
    pos = got["refill_positions"]
    assert position_report(trained_tiny, SPEC, pos.positions, mask).recall == 1.0
    # training only the inferred positions leaves every other value of the base as published
    assert outside_key_sha256(pos.model, pos.positions) == outside_key_sha256(base, pos.positions)
    # the base's real weights are worth something on this easy task: refilling beats chance
    assert accuracy(got["refill_positions"].model, tiny_data) > 0.5


@pytest.fixture(scope="module")
def token_locked(tiny_data):
    """tiny_net token-locked with a 2x2 binary token (16 patterns: enumerable)."""
    token = Token.generate("binary", 2, seed=3)
    torch.manual_seed(0)
    model = tiny_net()
    train, val = tiny_data.subset(range(640)), tiny_data.subset(range(640, 768))
    cfg = TokenLockConfig(decoy_frac=0.5, near_frac=0.5)
    tc = TrainConfig(epochs=8, lr=0.05, device="cpu")
    fit_token_lock(model, train, val, token, cfg, tc, num_classes=4, progress=False)
    return model, token


def test_exhaustive_token_search_finds_a_small_token(token_locked, tiny_data):
    model, token = token_locked
    assert accuracy(model, tiny_data, input_fn=stamp_fn(token)) > 0.9
    found = token_search(model, tiny_data.subset(range(64)), token, budget=64)
    assert found.exhaustive and found.tries == 16 and found.space_bits == 4
    assert accuracy(model, tiny_data, input_fn=stamp_fn(found.best)) > 0.9


def test_guided_search_stays_in_budget_on_a_large_space(token_locked, tiny_data):
    model, _ = token_locked
    big = Token.generate("binary", 8, seed=1)
    assert space_bits(big) == 64
    found = token_search(model, tiny_data.subset(range(32)), big, budget=100)
    assert not found.exhaustive and found.tries <= 100
    with pytest.raises(TokenError, match="binary"):
        token_search(model, tiny_data, Token.generate("square3x3"), budget=10)
    with pytest.raises(ConfigError, match="2 <= n"):
        attacker_split(tiny_data, 1)
    assert copy.deepcopy(found.summary())["space_bits"] == 64
