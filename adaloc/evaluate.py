"""Evaluation helpers: accuracy, per-class accuracy, chance level, authorized vs unauthorized."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adaloc.device import autocast, best_device


@torch.no_grad()
def predict(
    model: nn.Module,
    data,
    *,
    input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Predicted class of every sample of ``data`` (an ImageSet); input_fn rewrites inputs."""
    dev = best_device(str(device) if device is not None else None)
    was_training = model.training
    model.to(dev).eval()
    preds = []
    for start in range(0, len(data.y), batch_size):
        x = data.x[start : start + batch_size].to(dev)
        if input_fn is not None:
            x = input_fn(x)
        with autocast(dev):
            out = model(x).float()
        pred = out.argmax(1)
        pred[~torch.isfinite(out).all(1)] = -1  # a broken (NaN) output is no answer
        preds.append(pred.cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def accuracy(model: nn.Module, data, **kwargs) -> float:
    """Top-1 accuracy in [0, 1] (NaN outputs count as wrong, never as a class)."""
    if len(data.y) == 0:
        return float("nan")
    return float((predict(model, data, **kwargs) == data.y).float().mean())


def per_class_accuracy(model: nn.Module, data, num_classes: int, **kwargs) -> list[float]:
    """Accuracy for each class (NaN for a class absent from ``data``)."""
    pred = predict(model, data, **kwargs)
    out = []
    for c in range(num_classes):
        sel = data.y == c
        out.append(float((pred[sel] == c).float().mean()) if sel.any() else float("nan"))
    return out


def chance_level(num_classes: int) -> float:
    """Accuracy of guessing uniformly at random."""
    return 1.0 / num_classes


def evaluate_lock(
    base: nn.Module, key, data, *, num_classes: int | None = None, seed: int = 0, **kwargs
) -> dict:
    """Authorized (base + key), unauthorized (base alone) and random-key accuracy."""
    from adaloc.lock import random_key, unlock

    authorized = unlock(base, key)
    forged = unlock(base, random_key(key, seed=seed))
    n = num_classes or int(data.y.max()) + 1
    return {
        "authorized_acc": accuracy(authorized, data, **kwargs),
        "unauthorized_acc": accuracy(base, data, **kwargs),
        "random_key_acc": accuracy(forged, data, **kwargs),
        "chance": chance_level(n),
    }
