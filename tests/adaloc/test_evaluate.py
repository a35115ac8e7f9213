"""Evaluation runs conv nets channels-last for speed and gives them back untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaloc.data import ImageSet
from adaloc.evaluate import accuracy, logits
from adaloc.lock import state_sha256


def two_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),  # 4-D weight whose layout channels-last changes
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


@pytest.fixture()
def data() -> ImageSet:
    g = torch.Generator().manual_seed(1)
    return ImageSet(torch.rand(70, 3, 9, 9, generator=g), torch.randint(0, 5, (70,), generator=g))


def test_logits_match_plain_forward_and_leave_the_model_as_it_was(data):
    model = two_conv_net().eval()
    before = state_sha256(model)
    with torch.no_grad():
        expected = model(data.x)
    out = logits(model, data, batch_size=32, device="cpu")
    assert out.shape == (70, 5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert state_sha256(model) == before
    assert all(t.is_contiguous() for t in model.state_dict().values())
    assert not model.training


def test_layout_restored_when_evaluation_fails(data):
    model = two_conv_net().train()

    def broken(x):
        raise RuntimeError("input_fn failed")

    with pytest.raises(RuntimeError, match="input_fn failed"):
        accuracy(model, data, input_fn=broken, device="cpu")
    assert all(t.is_contiguous() for t in model.state_dict().values())
    assert model.training
