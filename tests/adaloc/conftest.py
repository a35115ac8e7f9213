"""Tiny models and data for fast core tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaloc.data import ImageSet
from adaloc.training import TrainConfig, fit


def tiny_net() -> nn.Module:
    """Conv + BatchNorm + two linear layers: every kind of tensor a key can hold."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def quadrant_images(n: int) -> ImageSet:
    """A learnable 4-class problem of ``n`` 12x12 images: the class is which quadrant is bright."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 1, 12, 12, generator=g) * 0.3
    for c in range(4):
        r, col = divmod(c, 2)
        x[y == c, :, r * 6 : r * 6 + 6, col * 6 : col * 6 + 6] += 0.7
    return ImageSet(x.clamp(0, 1), y)


@pytest.fixture(scope="session")
def tiny_data() -> ImageSet:
    return quadrant_images(768)


@pytest.fixture(scope="session")
def trained_tiny(tiny_data) -> nn.Module:
    """tiny_net trained for a few epochs (shared, read-only: tests deep-copy it)."""
    torch.manual_seed(0)
    model = tiny_net()
    fit(model, tiny_data, TrainConfig(epochs=4, lr=0.05, seed=0), progress=False)
    return model
