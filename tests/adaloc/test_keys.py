"""KeySpec validation and key selection."""

from __future__ import annotations

import dataclasses

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


def test_match_fanout_spreads_keyed_units_over_fanout_ranks():
    # an MLP whose first-layer units with large outgoing weights are also the large rows: a
    # magnitude pick takes the units with the largest fan-out, a matched pick one per stratum
    from adaloc.keys import fanout

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 40), torch.nn.ReLU(), torch.nn.Linear(40, 30), torch.nn.ReLU(),
        torch.nn.Linear(30, 4),
    )  # fmt: skip
    with torch.no_grad():
        scale = torch.linspace(0.1, 3.0, 40)
        w0, w2 = net[0].weight, net[2].weight
        w0.copy_(w0 / w0.abs().sum(1, keepdim=True) * scale[:, None])  # L1 row = scale
        w2.copy_(w2 / w2.norm(dim=0, keepdim=True) * scale[None, :])  # column norm = scale
    spec = KeySpec(budget=0.15, selection="first", include_head=False)
    plain = select_key(net, spec)
    matched = select_key(net, dataclasses.replace(spec, match_fanout=True))
    n = plain.indices["0.weight"].numel()
    assert n >= 4 and matched.indices["0.weight"].numel() == n  # same budget, same rows
    assert torch.equal(matched.indices["0.bias"], matched.indices["0.weight"])
    by_fanout = torch.argsort(fanout(dict(net.named_parameters()), "0.weight"))
    keyed = set(matched.indices["0.weight"].tolist())
    strata = torch.tensor_split(by_fanout, n)
    assert [len(keyed & set(s.tolist())) for s in strata] == [1] * n  # one per stratum
    assert set(plain.indices["0.weight"].tolist()) == set(by_fanout[-n:].tolist())  # the top
    assert KeySpec.from_json(KeySpec(match_fanout=True).to_json()).match_fanout
