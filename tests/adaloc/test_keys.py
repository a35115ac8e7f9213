"""KeySpec validation and key selection."""

from __future__ import annotations

import pytest
import torch

from adaloc.errors import ConfigError
from adaloc.keys import KeySpec, select_key


def test_keyspec_json_round_trip():
    spec = KeySpec(budget=0.1, selection="saliency", granularity="element", seed=3)
    assert KeySpec.from_json(spec.to_json()) == spec
    assert spec.to_dict()["format_version"] == 1


@pytest.mark.parametrize("budget", [0, 1, 1.5, -0.1])
def test_budget_outside_unit_interval_names_value(budget):
    with pytest.raises(ConfigError, match=str(budget)):
        KeySpec(budget=budget)


@pytest.mark.parametrize(
    "field,value", [("selection", "best"), ("granularity", "block"), ("bn_stats", "drop")]
)
def test_unknown_choices_rejected(field, value):
    with pytest.raises(ConfigError, match=value):
        KeySpec(**{field: value})


def test_unknown_fields_from_newer_versions_warn():
    with pytest.warns(UserWarning, match="future_field"):
        spec = KeySpec.from_dict({"budget": 0.05, "future_field": 1})
    assert spec.budget == 0.05


@pytest.mark.parametrize("selection", ["magnitude", "bottom", "random", "saliency", "first"])
@pytest.mark.parametrize("granularity", ["row", "element"])
def test_budget_is_a_fraction_of_parameters(trained_tiny, tiny_data, selection, granularity):
    spec = KeySpec(budget=0.25, selection=selection, granularity=granularity)
    mask = select_key(trained_tiny, spec, data=tiny_data)
    total = sum(p.numel() for p in trained_tiny.parameters())
    assert 0 < mask.params_in_key(trained_tiny) <= 0.25 * total
    # deterministic for a seed
    again = select_key(trained_tiny, spec, data=tiny_data)
    assert all(torch.equal(mask.indices[n], again.indices[n]) for n in mask.names)


def test_forced_parts_are_whole(trained_tiny):
    mask = select_key(trained_tiny, KeySpec(budget=0.3))
    state = trained_tiny.state_dict()
    for name in ("1.weight", "1.bias", "1.running_mean", "7.weight", "7.bias"):
        assert mask.indices[name].numel() == state[name].shape[0]
    frozen_stats = select_key(trained_tiny, KeySpec(budget=0.3, bn_stats="freeze"))
    assert "1.running_mean" not in frozen_stats.indices


def test_magnitude_and_bottom_pick_opposite_rows(trained_tiny):
    top = select_key(trained_tiny, KeySpec(budget=0.3, include_norm=False, include_head=False))
    bot = select_key(
        trained_tiny,
        KeySpec(budget=0.3, selection="bottom", include_norm=False, include_head=False),
    )
    w = trained_tiny.state_dict()["5.weight"]
    l1 = w.abs().sum(1)
    if "5.weight" in top.indices and "5.weight" in bot.indices:
        assert l1[top.indices["5.weight"]].mean() > l1[bot.indices["5.weight"]].mean()


def test_budget_too_small_for_forced_parts(trained_tiny):
    with pytest.raises(ConfigError, match="forced part"):
        select_key(trained_tiny, KeySpec(budget=0.001))


def test_saliency_needs_data(trained_tiny):
    with pytest.raises(ConfigError, match="saliency"):
        select_key(trained_tiny, KeySpec(budget=0.3, selection="saliency"))
