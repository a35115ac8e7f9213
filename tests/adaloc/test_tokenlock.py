"""Token-locked training, evaluation and the two-factor lock on tiny models and data."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adaloc.data import ImageSet
from adaloc.errors import ConfigError
from adaloc.evaluate import accuracy
from adaloc.keys import KeySpec, select_key
from adaloc.lock import outside_key_sha256, state_sha256
from adaloc.token import Token, stamp
from adaloc.tokenlock import (
    STRATEGIES,
    TokenLockConfig,
    check_soft_targets,
    fit_token_lock,
    global_magnitude_prune,
    kl_loss,
    make_batch_fn,
    manipulated_targets,
    pruning_sweep,
    token_lock_metrics,
)
from adaloc.training import TrainConfig
from adaloc.twofactor import key_only_token_update, two_factor_lock, two_factor_matrix


def tiny_net() -> torch.nn.Module:
    """Two convs and max pooling: just enough to tell one 4x4 pattern from another."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(3),  # max, not mean: a corner stamp must not be averaged away
        nn.Flatten(),
        nn.Linear(144, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


TOKEN = Token.generate("binary", 4, seed=1, placement="top-left")
HARDENED = TokenLockConfig("single_target", p=0.5, target_class=0, decoy_frac=0.7)


def test_manipulated_targets_follow_each_strategy():
    y = torch.tensor([0, 1, 2, 3, 3])
    g = torch.Generator().manual_seed(0)
    single = manipulated_targets(y, 4, "single_target", target_class=2)
    assert torch.equal(single.argmax(1), torch.full((5,), 2))
    assert torch.equal(manipulated_targets(y, 4, "next_class").argmax(1), (y + 1) % 4)
    assert torch.allclose(
        manipulated_targets(y, 4, "uniform_distribution"), torch.full((5, 4), 0.25)
    )
    uet = manipulated_targets(y, 4, "uniform_except_true")
    assert torch.all(uet.gather(1, y.view(-1, 1)) == 0) and torch.allclose(
        uet.sum(1), torch.ones(5)
    )
    rnd = manipulated_targets(torch.zeros(400, dtype=torch.long), 4, "random_target", generator=g)
    assert set(rnd.argmax(1).tolist()) == {0, 1, 2, 3}
    for name in STRATEGIES:
        check_soft_targets(manipulated_targets(y, 4, name, generator=g))


def test_kl_loss_is_cross_entropy_for_one_hot_and_zero_at_the_target():
    logits = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert torch.allclose(kl_loss(logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y))
    assert torch.allclose(kl_loss(logits, y), F.cross_entropy(logits, y))
    soft = torch.softmax(logits, 1)
    assert float(kl_loss(logits, soft)) == pytest.approx(0.0, abs=1e-6)


def test_batch_fn_stamps_with_probability_p_and_relabels_the_rest():
    x = torch.zeros(4000, 1, 8, 8)
    y = torch.randint(1, 4, (4000,))
    cfg = TokenLockConfig("single_target", p=0.3, target_class=0)
    out, target = make_batch_fn(TOKEN, cfg, 4)(x, y, torch.Generator().manual_seed(0))
    stamped = (out[:, 0, :4, :4] == torch.tensor(TOKEN.pixels)[0]).flatten(1).all(1)
    assert abs(float(stamped.float().mean()) - 0.3) < 0.03
    assert torch.equal(target[stamped].argmax(1), y[stamped])
    assert torch.all(target[~stamped].argmax(1) == 0)
    assert torch.equal(out[~stamped], x[~stamped]), "plain recipe leaves unauthorized pixels alone"


def test_hardened_batch_fn_marks_decoys_unauthorized():
    x = torch.zeros(4000, 1, 8, 8)
    y = torch.randint(1, 4, (4000,))
    out, target = make_batch_fn(TOKEN, HARDENED, 4)(x, y, torch.Generator().manual_seed(0))
    true = (out[:, 0, :4, :4] == torch.tensor(TOKEN.pixels)[0]).flatten(1).all(1)
    decoy = (out != 0).flatten(1).any(1) & ~true
    assert 0.3 < float(decoy.float().mean()) < 0.4  # (1 - p) * decoy_frac = 0.35
    assert torch.all(target[decoy].argmax(1) == 0)
    assert torch.equal(target[true].argmax(1), y[true])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0.0}, "p=0.0"),
        ({"p": 1.0}, "p=1.0"),
        ({"p": -0.2}, "p=-0.2"),
        ({"strategy": "flip"}, "'flip'"),
        ({"decoy_frac": 1.5}, "decoy_frac=1.5"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TokenLockConfig(**kwargs)


def test_soft_target_not_summing_to_one_raises():
    with pytest.raises(ConfigError, match="sums to 0.9"):
        check_soft_targets(torch.tensor([[0.5, 0.5], [0.6, 0.3]]))
    with pytest.raises(ConfigError, match="sums to 1.2"):
        kl_loss(torch.zeros(1, 2), torch.tensor([[0.6, 0.6]]))
    with pytest.raises(ConfigError, match="target_class=7"):
        manipulated_targets(torch.tensor([0]), 4, "single_target", target_class=7)


def test_pruning_zeroes_the_smallest_weights_on_a_copy():
    model = tiny_net()
    before = state_sha256(model)
    pruned = global_magnitude_prune(model, 0.5)
    weights = [
        m.weight for m in pruned.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert 0.49 <= zeros / total <= 0.51 and state_sha256(model) == before
    with pytest.raises(ConfigError, match="sparsity=1.0"):
        global_magnitude_prune(model, 1.0)


@pytest.fixture(scope="module")
def splits(tiny_data):
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(tiny_data), generator=g)
    return tiny_data.subset(idx[:512]), tiny_data.subset(idx[512:640]), tiny_data.subset(idx[640:])


@pytest.fixture(scope="module")
def locked(splits):
    """A tiny hardened token-locked model (shared read-only; tests deep-copy it)."""
    train, val, _ = splits
    torch.manual_seed(0)
    model = tiny_net()
    info = fit_token_lock(
        model,
        train,
        val,
        TOKEN,
        HARDENED,
        TrainConfig(epochs=8, lr=0.05, seed=0),
        num_classes=4,
        progress=False,
    )
    return model, info


def test_token_locked_model_needs_the_token(locked, splits):
    model, info = locked
    test = splits[2]
    m = token_lock_metrics(model, test, TOKEN, forged=10, seed=3)
    assert m["with_token_acc"] >= 0.85
    assert m["without_token_acc"] <= 0.35  # chance is 0.25
    assert m["with_token_acc"] - m["without_token_acc"] >= 0.5
    assert m["forged_token_acc_mean"] <= 0.45 and m["wrong_place_acc"] <= 0.45
    assert 1 <= info["epoch"] <= 8 and info["val_gap"] > 0.5
    rows = pruning_sweep(model, test, TOKEN, sparsities=(0.0, 0.9))
    assert rows[0]["with_token_acc"] == pytest.approx(m["with_token_acc"])
    assert [r["sparsity"] for r in rows] == [0.0, 0.9]


def test_checkpoint_selection_uses_validation_not_test(locked, splits):
    _, info = locked
    assert set(info["val"]) >= {"with_token_acc", "without_token_acc", "forged_token_acc_mean"}
    with pytest.raises(ConfigError, match="validation"):
        empty = ImageSet(torch.zeros(0, 1, 12, 12), torch.zeros(0, dtype=torch.long))
        fit_token_lock(
            tiny_net(),
            splits[0],
            empty,
            TOKEN,
            HARDENED,
            TrainConfig(epochs=1),
            num_classes=4,
            progress=False,
        )


def test_two_factor_needs_key_and_token_and_survives_key_only_updates(locked, splits):
    model, _ = locked
    train, val, test = splits
    model = copy.deepcopy(model)
    mask = select_key(model, KeySpec(budget=0.2, include_norm=True, include_head=True))
    base, key = two_factor_lock(model, mask)
    v1 = two_factor_matrix(base, key, test, TOKEN)
    assert v1["key_and_token"] >= 0.85
    assert max(v1["key_only"], v1["token_only"], v1["neither"]) <= 0.45
    outside = outside_key_sha256(base, mask)
    new_key, info = key_only_token_update(
        base,
        key,
        train,
        val,
        TOKEN,
        HARDENED,
        TrainConfig(epochs=2, lr=0.01, seed=1),
        num_classes=4,
        progress=False,
    )
    assert (new_key.version, new_key.parent) == (2, 1)
    assert info["outside_key_sha256"] == outside
    v2 = two_factor_matrix(base, new_key, test, TOKEN)
    assert v2["key_and_token"] >= 0.85 and v2["key_only"] <= 0.45
    stamped = ImageSet(stamp(test.x, TOKEN), test.y)
    assert accuracy(base, stamped) <= 0.45  # the base alone, token or not, stays useless
