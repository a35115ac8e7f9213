"""The layer-wise bound on the logit change holds on real batches, and its parts are sound."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaloc.bounds import bound_report, conv_norm, logit_change_bound
from adaloc.errors import ModelError
from adaloc.keys import KeySpec, select_key
from adaloc.lock import lock, unlock
from adaloc.training import TrainConfig, fit


def test_conv_norm_bounds_the_true_operator_norm():
    """Power iteration on the convolution operator never exceeds conv_norm."""
    g = torch.Generator().manual_seed(0)
    for stride, pad in ((1, 1), (2, 1), (1, 0)):
        conv = nn.Conv2d(3, 5, 3, stride=stride, padding=pad, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        x = torch.randn(1, 3, 12, 12, generator=g)
        for _ in range(100):  # power iteration on A^T A through autograd
            x = x.detach().requires_grad_()
            y = conv(x)
            (gx,) = torch.autograd.grad(y, x, y)
            x = gx / gx.norm()
        op = float(conv(x.detach()).detach().norm() / x.norm())
        assert op <= conv_norm(conv.weight.detach()) * (1 + 1e-6)
        assert op >= 0.2 * conv_norm(conv.weight.detach())  # and not absurdly loose here


@pytest.mark.parametrize("fill", ["zeros", "matched"])
def test_bound_holds_for_key_removal_and_key_only_update(trained_tiny, tiny_data, fill):
    mask = select_key(trained_tiny, KeySpec(budget=0.1))
    base, key = lock(trained_tiny, mask, fill=fill)
    authorized = unlock(base, key)
    removal = bound_report(authorized, base, tiny_data)
    assert removal["violations"] == 0 and removal["measured_median"] > 0
    updated = copy.deepcopy(authorized)
    fit(updated, tiny_data, TrainConfig(epochs=1, lr=0.05, device="cpu"), mask=mask, progress=False)
    update = bound_report(authorized, updated, tiny_data)
    assert update["violations"] == 0 and update["measured_median"] > 0
    assert 0 < update["tightness_max"] <= 1 and 0 < removal["tightness_max"] <= 1


def test_bound_is_zero_for_identical_models(trained_tiny, tiny_data):
    bound, measured = logit_change_bound(trained_tiny, copy.deepcopy(trained_tiny), tiny_data.x)
    assert float(bound.max()) == 0.0 and float(measured.max()) == 0.0


def test_uncovered_layers_are_refused(tiny_data):
    class Residual(nn.Module):
        def forward(self, x):
            return x + x

    net = nn.Sequential(nn.Flatten(), Residual(), nn.Linear(144, 4))
    with pytest.raises(ModelError, match="Residual"):
        logit_change_bound(net, copy.deepcopy(net), tiny_data.x[:4])
    with pytest.raises(ModelError, match="Sequential"):
        logit_change_bound(nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(1, 2))
