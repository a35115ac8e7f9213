"""Device and mixed-precision selection: CUDA (+AMP) when present, CPU otherwise."""

from __future__ import annotations

import contextlib

import torch


def best_device(requested: str | None = None) -> torch.device:
    """Return the requested device, or CUDA when available, else CPU."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            from adaloc.errors import ConfigError

            raise ConfigError(f"device={requested!r}: no CUDA device is available; use 'cpu'")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool = True):
    """Autocast context: fp16 AMP on CUDA, a no-op on CPU (keeps CPU results exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """GradScaler that is active only for CUDA AMP."""
    return torch.amp.GradScaler("cuda", enabled=enabled and device.type == "cuda")
