"""Domain shifts (image corruptions) applied to whole [N, C, H, W] batches, deterministically."""

from __future__ import annotations

import torch

from adaloc.errors import ConfigError

SHIFTS: tuple[str, ...] = ("invert", "rotate", "blur", "contrast", "noise")

# Fixed strengths: a shift is a *domain*, so train, val and test of one stage must see the
# same transformation; only "noise" draws random values, and those come from the seed.
ROTATE_DEGREES = 30.0
BLUR_SIGMA = 1.0
CONTRAST_FACTOR = 0.3
NOISE_STD = 0.2


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"apply_shift expects a float tensor [N, C, H, W]; got {shape}")


def _blur(x: torch.Tensor) -> torch.Tensor:
    # torchvision is imported where used: it adds seconds to `import adaloc.data` otherwise.
    from torchvision.transforms.v2 import functional as tvf

    side = min(x.shape[-2:])
    if side < 2:
        return x.clone()
    # Reflect padding needs pad < side, so tiny images (digits are 8x8) get a smaller kernel.
    kernel = 5 if side > 4 else 3
    return tvf.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[BLUR_SIGMA, BLUR_SIGMA])


def _contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + CONTRAST_FACTOR * (x - mean)).clamp(0.0, 1.0)


def _noise(x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    return (x + NOISE_STD * noise).clamp(0.0, 1.0)


def apply_shift(x: torch.Tensor, name: str, *, seed: int = 0) -> torch.Tensor:
    """Return a shifted copy of images `x` [N, C, H, W] in [0, 1]; `x` is left untouched.

    `name` is one of SHIFTS; the result depends only on `x`, `name` and `seed`
    (only "noise" uses the seed).
    """
    if name not in SHIFTS:
        raise ConfigError(f"unknown shift {name!r}; expected one of {', '.join(SHIFTS)}")
    _check_images(x)
    if name == "invert":
        return 1.0 - x
    if name == "rotate":
        from torchvision.transforms.v2 import functional as tvf

        # Bilinear rotation about the centre keeps H x W (rot90 would swap non-square sides).
        return tvf.rotate(x, angle=ROTATE_DEGREES, interpolation=tvf.InterpolationMode.BILINEAR)
    if name == "blur":
        return _blur(x)
    if name == "contrast":
        return _contrast(x)
    return _noise(x, seed)
