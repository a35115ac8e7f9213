"""The key-only update recipe: statistics warm start, budget on val, lock kept, defaults shared."""

from __future__ import annotations

import copy

import pytest
import torch

from adaloc.adapt import UpdateRecipe, adapt, planned_epochs, recalibrate_batchnorm
from adaloc.data import ImageSet
from adaloc.errors import ConfigError
from adaloc.evaluate import accuracy
from adaloc.keys import KeySpec, select_key, stem_module_name
from adaloc.lock import lock, outside_key_sha256, random_key, unlock
from adaloc.shifts import apply_shift


def _split(data: ImageSet, n_train: int, n_val: int) -> tuple[ImageSet, ImageSet, ImageSet]:
    idx = torch.arange(len(data))
    return (
        data.subset(idx[:n_train]),
        data.subset(idx[n_train : n_train + n_val]),
        data.subset(idx[n_train + n_val :]),
    )


def _inverted(data: ImageSet) -> ImageSet:
    return ImageSet(apply_shift(data.x, "invert"), data.y)


def test_recipe_validates_and_plans_budget():
    with pytest.raises(ConfigError, match="optimizer"):
        UpdateRecipe(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="lr"):
        UpdateRecipe(lr=0.0)
    with pytest.raises(ConfigError, match="max_epochs"):
        UpdateRecipe(max_epochs=0)
    r = UpdateRecipe(min_steps=100, max_epochs=30, batch_size=10)
    assert planned_epochs(r, 1000, 2) == 2  # 100 steps per epoch: the caller's floor holds
    assert planned_epochs(r, 100, 2) == 10  # 10 steps per epoch: raised to reach 100 steps
    assert planned_epochs(r, 20, 2) == 30  # capped


def test_recalibration_moves_only_keyed_statistics(trained_tiny, tiny_data):
    model = copy.deepcopy(trained_tiny)
    mask = select_key(model, KeySpec(budget=0.3))
    shifted = _inverted(tiny_data)
    before_out = outside_key_sha256(model, mask)
    mean_before = model[1].running_mean.clone()
    assert recalibrate_batchnorm(model, shifted, mask) == 1
    assert outside_key_sha256(model, mask) == before_out  # step counter written back too
    # the re-estimated mean is the channel mean of the first conv's output on the new data
    with torch.no_grad():
        expect = model[0](shifted.x).mean(dim=(0, 2, 3))
    assert torch.allclose(model[1].running_mean, expect, atol=1e-4)
    assert not torch.allclose(model[1].running_mean, mean_before)
    frozen = select_key(model, KeySpec(budget=0.3, bn_stats="freeze"))
    assert recalibrate_batchnorm(copy.deepcopy(model), shifted, frozen) == 0


def test_key_only_update_adapts_to_inversion_and_keeps_the_lock(trained_tiny, tiny_data):
    """Inverted inputs: the recipe recovers the task key-only; base and random key stay low."""
    spec = KeySpec(budget=0.3, selection="saliency", include_stem=True)
    mask = select_key(trained_tiny, spec, data=tiny_data)
    base, key = lock(trained_tiny, mask)
    train, val, test = _split(_inverted(tiny_data), 256, 128)
    model = unlock(base, key)
    start = accuracy(model, test)
    recipe = UpdateRecipe(min_steps=60, max_epochs=15, patience_steps=30)
    rep = adapt(model, train, val, mask=mask, recipe=recipe, epochs=1, progress=False)
    assert outside_key_sha256(model, mask) == outside_key_sha256(base, mask)
    assert rep.epochs_planned == 15 and 1 <= rep.epochs_run <= 15
    assert rep.val_best >= rep.val_start
    after = accuracy(model, test)
    assert after > 0.9 and after > start + 0.3, (start, after)
    from adaloc.lock import extract_key

    new_key = extract_key(model, mask, base_sha256=key.base_sha256, version=2, parent=1)
    assert accuracy(base, test) < 0.45
    assert accuracy(unlock(base, random_key(new_key, seed=1)), test) < 0.45


def test_full_update_with_sgd_config_and_no_val(trained_tiny, tiny_data):
    from adaloc.training import TrainConfig

    model = copy.deepcopy(trained_tiny)
    train, _, test = _split(tiny_data, 256, 0)
    recipe = UpdateRecipe(min_steps=8, max_epochs=3, recalibrate_bn=False)
    cfg = TrainConfig(optimizer="sgd", lr=0.01)
    rep = adapt(model, train, None, mask=None, recipe=recipe, cfg=cfg, epochs=1, progress=False)
    assert rep.epochs_run == rep.epochs_planned == 2 and rep.val_best is None
    assert not torch.equal(model[0].weight, trained_tiny[0].weight)


def test_stem_goes_whole_into_the_key(trained_tiny, tiny_data):
    assert stem_module_name(trained_tiny) == "0"
    mask = select_key(trained_tiny, KeySpec(budget=0.3, include_stem=True), data=tiny_data)
    assert len(mask.indices["0.weight"]) == trained_tiny[0].weight.shape[0]
    assert len(mask.indices["0.bias"]) == trained_tiny[0].bias.shape[0]
    assert KeySpec.from_json(KeySpec(include_stem=True).to_json()).include_stem


def test_epoch_callbacks_see_a_whole_lock_and_can_stop_training(trained_tiny, tiny_data):
    """KeyGuard writes back per step only what can move; callbacks still see every non-key
    value (BatchNorm step counters included) at its base value, and True stops the loop."""
    from adaloc.training import TrainConfig, fit

    model = copy.deepcopy(trained_tiny)
    mask = select_key(model, KeySpec(budget=0.3), data=tiny_data)
    start = outside_key_sha256(model, mask)
    seen = []

    def check(epoch, m):
        seen.append(outside_key_sha256(m, mask))
        return epoch == 1

    cfg = TrainConfig(epochs=5, optimizer="adam", lr=0.01, weight_decay=1e-3)
    rep = fit(model, tiny_data, cfg, mask=mask, on_epoch_end=check, progress=False)
    assert seen == [start, start] and len(rep.losses) == 2
    assert outside_key_sha256(model, mask) == start


def test_polarity_candidate_wins_on_inverted_data_only(trained_tiny, tiny_data):
    """Re-estimated statistics + negated first BatchNorm scale undo an inversion; the val
    split picks that start under inversion and the plain start otherwise."""
    mask = select_key(trained_tiny, KeySpec(budget=0.3), data=tiny_data)
    recipe = UpdateRecipe(min_steps=0, max_epochs=1, patience_steps=1, lr=1e-6)
    flips = {}
    for name, data in (("clean", tiny_data), ("inverted", _inverted(tiny_data))):
        train, val, test = _split(data, 256, 128)
        model = copy.deepcopy(trained_tiny)
        rep = adapt(model, train, val, mask=mask, recipe=recipe, epochs=1, progress=False)
        flips[name] = rep.start
        assert outside_key_sha256(model, mask) == outside_key_sha256(trained_tiny, mask)
        assert accuracy(model, test) > 0.9, name  # lr 1e-6: the start alone does this
    assert flips["inverted"] == "flipped" and flips["clean"] in ("parent", "reestimated")


def test_start_margin_keeps_the_start_unless_the_val_gain_clears_it(trained_tiny, tiny_data):
    """A val gain within the margin (in standard errors) reverts to the start's key values."""
    from adaloc.adapt import _below_margin
    from adaloc.lock import extract_key

    assert _below_margin((0.82, 0.0), (0.80, 0.0), 75, 1.0)  # 2 points < 1 SE (4.6 points)
    assert not _below_margin((0.90, 0.0), (0.80, 0.0), 75, 1.0)
    assert not _below_margin((0.81, 0.0), (0.80, 0.0), 75, 0.0)
    with pytest.raises(ConfigError, match="start_margin"):
        UpdateRecipe(start_margin=-1)
    mask = select_key(trained_tiny, KeySpec(budget=0.3), data=tiny_data)
    train, val, _ = _split(_inverted(tiny_data), 256, 128)
    keys = {}
    for margin in (0.0, 1e6):
        model = copy.deepcopy(trained_tiny)
        recipe = UpdateRecipe(
            min_steps=60,
            max_epochs=15,
            patience_steps=30,
            recalibrate_bn=False,
            start_margin=margin,
        )
        rep = adapt(model, train, val, mask=mask, recipe=recipe, epochs=1, progress=False)
        keys[margin] = (rep, extract_key(model, mask, base_sha256=""))
    moved, kept = keys[0.0][0], keys[1e6][0]
    assert moved.best_epoch > 0 and not moved.kept_start and moved.val_best > moved.val_start
    assert kept.kept_start and kept.best_epoch == 0 and kept.val_best == kept.val_start
    start_key = extract_key(trained_tiny, mask, base_sha256="")  # no re-estimation: the parent
    assert all(torch.equal(keys[1e6][1].values[n], v) for n, v in start_key.values.items())
