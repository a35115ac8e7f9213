"""Model builders that adapt to the data: input channels, image size and class count.

Every builder returns a module whose LAST registered module is the classifier `nn.Linear`
(key selection finds the head that way). Torchvision models are built with `weights=None`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch.nn as nn

from adaloc.errors import ModelError

MODEL_NAMES: tuple[str, ...] = ("cnn", "mlp", "resnet18", "densenet121", "convnext_tiny")
# Torchvision stems downsample 4x (32x overall); below this side we switch to a gentle stem.
SMALL_IMAGE = 64
MIN_IMAGE_SIDE = 8

ImageSize = int | tuple[int, int] | None


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def _cnn(
    *,
    in_channels: int,
    num_classes: int,
    size: tuple[int, int] | None,
    channels: Sequence[int] = (32, 64, 64),
    hidden: int = 128,
) -> nn.Module:
    """Small 5-layer CNN (3 conv + 2 linear, ~130k params at 28x28x1, 10 classes)."""
    if len(channels) != 3 or min(channels) < 1 or hidden < 1:
        raise ModelError(f"cnn needs 3 positive channels and hidden >= 1; got {channels}, {hidden}")
    c1, c2, c3 = channels
    return nn.Sequential(
        # pooling early keeps a CPU training epoch of Fashion-MNIST in seconds, not minutes
        *_conv_block(in_channels, c1),
        nn.MaxPool2d(2),
        *_conv_block(c1, c2),
        nn.MaxPool2d(2),
        *_conv_block(c2, c3),
        # Adaptive pooling makes the head independent of the input size (8x8 up to 64x64+).
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(c3 * 9, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _mlp(
    *,
    in_channels: int,
    num_classes: int,
    size: tuple[int, int] | None,
    hidden: Sequence[int] = (256, 256, 256),
) -> nn.Module:
    """Fully connected net on flattened pixels (the M-LOCK paper's 784-256-256-256-10)."""
    if size is None:
        raise ModelError("model 'mlp' needs image_size (its input width is C*H*W); got None")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * size[0] * size[1]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _is_small(size: tuple[int, int] | None, small_stem: bool | None) -> bool:
    if small_stem is not None:
        return small_stem
    return size is not None and min(size) < SMALL_IMAGE


def _resnet18(
    *,
    in_channels: int,
    num_classes: int,
    size: tuple[int, int] | None,
    small_stem: bool | None = None,
) -> nn.Module:
    """ResNet-18; small images get a 3x3 stride-1 stem without max-pool (CIFAR style)."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if _is_small(size, small_stem):
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def _densenet121(
    *,
    in_channels: int,
    num_classes: int,
    size: tuple[int, int] | None,
    small_stem: bool | None = None,
) -> nn.Module:
    """DenseNet-121; small images get a 3x3 stride-1 stem without the first pooling."""
    from torchvision.models import densenet121

    model = densenet121(weights=None, num_classes=num_classes)
    if _is_small(size, small_stem):
        model.features.conv0 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    elif in_channels != 3:
        model.features.conv0 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def _convnext_tiny(
    *,
    in_channels: int,
    num_classes: int,
    size: tuple[int, int] | None,
    small_stem: bool | None = None,
) -> nn.Module:
    """ConvNeXt-Tiny; the 4x4 patchify stem shrinks for small images so 3 downsamplings fit."""
    from torchvision.models import convnext_tiny

    model = convnext_tiny(weights=None, num_classes=num_classes)
    stride = 4
    if _is_small(size, small_stem):
        # After the stem three 2x2 downsamplings follow: the stem output side must stay >= 8.
        side = min(size) if size is not None else MIN_IMAGE_SIDE
        stride = next(s for s in (4, 2, 1) if side // s >= 8 or s == 1)
    if stride != 4 or in_channels != 3:
        old = model.features[0][0]
        model.features[0][0] = nn.Conv2d(in_channels, old.out_channels, stride, stride=stride)
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": _cnn,
    "mlp": _mlp,
    "resnet18": _resnet18,
    "densenet121": _densenet121,
    "convnext_tiny": _convnext_tiny,
}


def _image_size(image_size: ImageSize) -> tuple[int, int] | None:
    if image_size is None:
        return None
    try:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    except (TypeError, ValueError) as err:
        raise ModelError(f"image_size must be an int or (H, W); got {image_size!r}") from err
    if not (isinstance(h, int) and isinstance(w, int)) or min(h, w) < MIN_IMAGE_SIDE:
        raise ModelError(
            f"image_size must be int(s) >= {MIN_IMAGE_SIDE} (the models pool 3 times); "
            f"got {image_size!r}"
        )
    return h, w


def build_model(
    name: str = "cnn",
    *,
    in_channels: int,
    num_classes: int,
    image_size: ImageSize,
    **kwargs: object,
) -> nn.Module:
    """Build model `name` (one of MODEL_NAMES) for images [C, H, W] and `num_classes` classes.

    `image_size` is an int or (H, W) (None only for size-agnostic builders); extra `kwargs` go
    to the builder (cnn: channels, hidden; mlp: hidden; torchvision: small_stem).
    """
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ModelError(f"in_channels must be an int >= 1; got {in_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"num_classes must be an int >= 2; got {num_classes!r}")
    builder = _BUILDERS[name]
    accepted = set(inspect.signature(builder).parameters) - {"in_channels", "num_classes", "size"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelError(
            f"model {name!r} does not take {unknown}; accepted: {sorted(accepted) or 'none'}"
        )
    size = _image_size(image_size)
    return builder(in_channels=in_channels, num_classes=num_classes, size=size, **kwargs)
