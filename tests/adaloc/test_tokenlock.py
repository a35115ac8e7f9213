"""Token-locked training, evaluation and the two-factor lock on tiny models and data."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adaloc.data import ImageSet
from adaloc.errors import ConfigError
from adaloc.evaluate import accuracy, probe_accuracy
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
    selection_gap,
    token_lock_metrics,
    weighted_kl_loss,
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


def test_near_miss_decoys_are_unauthorized_and_near():
    cfg = TokenLockConfig(
        "single_target", p=0.5, target_class=0, decoy_frac=1.0, wrong_place_frac=0.0, near_frac=0.5
    )
    x = torch.zeros(4000, 1, 8, 8)
    y = torch.randint(1, 4, (4000,))
    out, target = make_batch_fn(TOKEN, cfg, 4)(x, y, torch.Generator().manual_seed(0))
    true = torch.tensor(TOKEN.pixels)[0]
    cells = out[:, 0, :4, :4]
    differ = (cells != true).flatten(1).sum(1)
    decoy = (differ > 0) & (out != 0).flatten(1).any(1)
    near = decoy & (differ <= 3)
    # half of the decoys are near misses (1-3 cells), plus the rare random draw that close
    assert 0.5 < float(near.sum() / decoy.sum()) < 0.6
    assert torch.all(target[decoy].argmax(1) == 0)
    assert torch.equal(target[differ == 0].argmax(1), y[differ == 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0.0}, "p=0.0"),
        ({"p": 1.0}, "p=1.0"),
        ({"p": -0.2}, "p=-0.2"),
        ({"strategy": "flip"}, "'flip'"),
        ({"decoy_frac": 1.5}, "decoy_frac=1.5"),
        ({"near_frac": -0.1}, "near_frac=-0.1"),
        ({"near_changes": 0}, "near_changes=0"),
        ({"unauth_weight": 0}, "unauth_weight=0"),
        ({"unauth_weight": -1.0}, "unauth_weight=-1.0"),
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


def test_weighted_loss_scales_only_the_unauthorized_samples():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    target = torch.full((6, 4), 0.25)
    target[:3] = F.one_hot(torch.tensor([0, 1, 2]), 4).float()
    record = {"auth": torch.tensor([True] * 3 + [False] * 3)}
    per = F.kl_div(F.log_softmax(logits, 1), target, reduction="none").sum(1)
    got = weighted_kl_loss(3.0, record)(logits, target)
    assert got == pytest.approx(float((per[:3].sum() + 3 * per[3:].sum()) / 6), rel=1e-5)
    assert weighted_kl_loss(1.0, record)(logits, target) == pytest.approx(
        float(kl_loss(logits, target)), rel=1e-5
    )


class _Fixed(torch.nn.Module):
    """Outputs chosen per sample from its label: a stand-in for what a lock leaks."""

    def __init__(self, table: dict, labels: torch.Tensor):
        super().__init__()
        self.table, self.labels, self.dummy = table, labels, torch.nn.Linear(1, 1)

    def forward(self, x):
        idx = x[:, 0, 0, 0].round().long()  # the sample's index is written in pixel (0, 0)
        return torch.stack([self.table[int(self.labels[i])] for i in idx])


def _indexed(n: int, k: int, seed: int) -> ImageSet:
    y = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    x = torch.zeros(n, 1, 4, 4)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return ImageSet(x, y)


def test_probe_sees_a_leak_argmax_misses_and_no_leak_in_a_constant_output():
    k, fit, test = 4, _indexed(400, 4, 1), _indexed(400, 4, 2)
    # "The true class is the least likely": argmax accuracy 0, yet fully informative.
    last = {c: torch.where(torch.arange(k) == c, -1.0, 0.0) for c in range(k)}
    for data in (fit, test):
        model = _Fixed(last, data.y)
        assert accuracy(model, data) == 0.0
    probe_model = _Fixed(last, torch.cat([fit.y, test.y]))
    test_shifted = ImageSet(test.x.clone(), test.y)
    test_shifted.x[:, 0, 0, 0] += len(fit.y)
    assert probe_accuracy(probe_model, fit, test_shifted) == 1.0
    constant = {c: torch.zeros(k) for c in range(k)}
    leak_free = _Fixed(constant, torch.cat([fit.y, test.y]))
    assert probe_accuracy(leak_free, fit, test_shifted) <= 0.4  # chance 0.25 + noise


def test_hardened_selection_counts_below_chance_as_a_leak(splits):
    _, val, _ = splits
    k = 4
    # A model answering (y + 1) mod k without the token: 0% without, a perfect leak.
    shifted = {c: F.one_hot(torch.tensor((c + 1) % k), k).float() * 5 for c in range(k)}
    true = {c: F.one_hot(torch.tensor(c), k).float() * 5 for c in range(k)}

    class Lock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Linear(1, 1)

        def forward(self, x):
            stamped = (x[:, :, :4, :4] == TOKEN.tensors(1)[0]).flatten(1).all(1)
            labels = self.labels[: len(x)]
            rows = [(true if s else shifted)[int(c)] for s, c in zip(stamped, labels, strict=True)]
            return torch.stack(rows)

    lock = Lock()
    lock.labels = val.y  # one batch: sample i of the batch is val sample i
    gap, m = selection_gap(lock, val, TOKEN, HARDENED, num_classes=k)
    assert m["without_token_acc"] == 0.0 and m["with_token_acc"] == 1.0
    # The plain rule would call this a perfect lock (gap 1.0); hardened counts |0 - chance|.
    assert gap == pytest.approx(1.0 - 0.5)
