"""Model builders: output shapes for every builder and input geometry, head placement, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adaloc.errors import ModelError
from adaloc.models import MODEL_NAMES, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # eval(): batch-1 BatchNorm in train mode has no variance to normalise with.
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 64, 48)])
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_small_models_fit_any_geometry(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, in_channels=shape[0], num_classes=7, image_size=shape[1:])
    assert forward(model, torch.rand(2, *shape)).shape == (2, 7)
    assert isinstance(list(model.modules())[-1], nn.Linear)


def test_default_cnn_size_and_mlp_paper_setting() -> None:
    cnn = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    assert 100_000 <= n_params(cnn) <= 150_000
    mlp = build_model("mlp", in_channels=1, num_classes=10, image_size=28)
    widths = [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert widths == [256, 256, 256, 10] and mlp[1].in_features == 784
    wide = build_model("mlp", in_channels=1, num_classes=10, image_size=28, hidden=(32,))
    assert n_params(wide) == 784 * 32 + 32 + 32 * 10 + 10


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "convnext_tiny"])
def test_torchvision_models_adapt_stem_and_head(name: str) -> None:
    torch.manual_seed(0)
    for channels, side in ((3, 32), (1, 28)):
        model = build_model(name, in_channels=channels, num_classes=5, image_size=side)
        assert forward(model, torch.rand(1, channels, side, side)).shape == (1, 5)
        assert isinstance(list(model.modules())[-1], nn.Linear)


def test_resnet_stem_depends_on_image_size() -> None:
    small = build_model("resnet18", in_channels=1, num_classes=3, image_size=32)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", in_channels=1, num_classes=3, image_size=224)
    assert large.conv1.stride == (2, 2) and large.conv1.in_channels == 1


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("vgg", {}, "unknown model 'vgg'.*cnn.*convnext_tiny"),
        ("mlp", {"image_size": None}, "needs image_size"),
        ("cnn", {"num_classes": 1}, "num_classes.*got 1"),
        ("cnn", {"in_channels": 0}, "in_channels.*got 0"),
        ("cnn", {"image_size": 4}, "image_size.*got 4"),
        ("cnn", {"depth": 3}, r"does not take \['depth'\]"),
        ("cnn", {"channels": (8, 8)}, "3 positive channels"),
    ],
)
def test_bad_model_arguments_raise(name: str, kwargs: dict, match: str) -> None:
    args = {"in_channels": 1, "num_classes": 10, "image_size": 28} | kwargs
    with pytest.raises(ModelError, match=match):
        build_model(name, **args)


def test_convnext_stem_shrinks_for_digits_sized_input() -> None:
    # 8x8 needs a stride-1 stem so the three 2x2 downsamplings still leave a 1x1 map.
    model = build_model("convnext_tiny", in_channels=1, num_classes=10, image_size=8)
    assert model.features[0][0].stride == (1, 1)
    assert forward(model, torch.rand(1, 1, 8, 8)).shape == (1, 10)
    assert set(MODEL_NAMES) == {"cnn", "mlp", "resnet18", "densenet121", "convnext_tiny"}
