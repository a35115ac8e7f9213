"""Partly keyed convolutions: key-row weight gradients, and the lock kept without write-back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaloc import keygrad
from adaloc.keys import KeyMask
from adaloc.training import KeyGuard, TrainConfig, fit


def two_conv_net() -> nn.Module:
    """A stem and a second (partly keyed) convolution with a bias, as in the lifecycle CNN."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 4),
    )


def _mask(model: nn.Module) -> KeyMask:
    """Stem and head whole, rows 1 and 4 of the second conv (its bias partly keyed too)."""
    whole = {n: torch.arange(p.shape[0]) for n, p in model.named_parameters()}
    picked = {n: whole[n] for n in ("0.weight", "1.weight", "1.bias", "7.weight", "7.bias")}
    picked["3.weight"] = picked["3.bias"] = torch.tensor([1, 4])
    return KeyMask(indices=picked, granularity="row")


def test_key_rows_get_the_masked_gradient_and_others_exact_zeros(tiny_data):
    torch.manual_seed(0)
    model = two_conv_net()
    mask = _mask(model)
    x, y = tiny_data.x[:32], tiny_data.y[:32]
    ref = copy.deepcopy(model)
    nn.functional.cross_entropy(ref(x), y).backward()
    guard = KeyGuard(model, mask)
    assert model[3] in guard._restricted and keygrad.supports(model[3])
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    assert torch.allclose(out, ref(x)), "the forward pass must not change"
    rows = mask.indices["3.weight"]
    g, g_ref = model[3].weight.grad, ref[3].weight.grad
    assert torch.allclose(g[rows], g_ref[rows], atol=1e-6)
    others = torch.ones(6, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(g[others], torch.zeros_like(g[others]))  # exactly zero, not small
    assert torch.allclose(model[0].weight.grad, ref[0].weight.grad, atol=1e-6)  # input grads
    guard.close()
    assert "forward" not in model[3].__dict__ and model[3].weight.requires_grad


@pytest.mark.parametrize(
    "optimizer,weight_decay", [("adam", 0.0), ("sgd", 0.0), ("sgd", 5e-4), ("adamw", 0.1)]
)
def test_partly_keyed_conv_keeps_every_non_key_value(tiny_data, optimizer, weight_decay):
    """No per-step write-back without decay, per-step write-back with it: both bit-exact."""
    torch.manual_seed(0)
    model = two_conv_net()
    mask = _mask(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, optimizer=optimizer, lr=0.05, weight_decay=weight_decay)
    fit(model, tiny_data, cfg, mask=mask, progress=False)
    after = model.state_dict()
    for name, old in before.items():
        if name in mask.indices:
            pos = mask.positions(name, old)
            assert torch.equal(after[name][~pos], old[~pos]), f"{name} moved outside the key"
        else:
            assert torch.equal(after[name], old), f"{name} is outside the key but changed"
    rows = mask.indices["3.weight"]
    assert not torch.equal(after["3.weight"][rows], before["3.weight"][rows])
    assert "forward" not in model[3].__dict__


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw"])
def test_steps_without_decay_leave_non_key_values_bit_identical(tiny_data, optimizer):
    """Why KeyGuard writes nothing back per step without decay: checked after every step."""
    from adaloc.training import make_optimizer, moves_without_gradient

    torch.manual_seed(0)
    model = two_conv_net()
    mask = _mask(model)
    cfg = TrainConfig(optimizer=optimizer, lr=0.05, weight_decay=0.0)
    assert not moves_without_gradient(cfg)
    assert moves_without_gradient(TrainConfig(optimizer=optimizer, weight_decay=1e-4))
    guard = KeyGuard(model, mask)
    opt = make_optimizer(guard.trainable(), cfg)
    pos = {n: mask.positions(n, p) for n, p in model.named_parameters() if n in mask.indices}
    frozen = {n: p.detach()[~pos[n]].clone() for n, p in model.named_parameters() if n in pos}
    for step in range(10):
        idx = torch.arange(step * 32, step * 32 + 32)
        loss = nn.functional.cross_entropy(model(tiny_data.x[idx]), tiny_data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            if n in pos:
                assert torch.equal(p.detach()[~pos[n]], frozen[n]), f"{n} moved at step {step}"
    guard.close()
