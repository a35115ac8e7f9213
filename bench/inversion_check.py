"""Tests issue 12's hypothesis: inversion is undone by the first norm layer alone.

    python bench/inversion_check.py --dataset digits --epochs 8

Trains the lifecycle CNN on the base stage, then scores it on the inverted test set (a)
as is, (b) after re-estimating every BatchNorm's statistics on inverted training images,
(c) after re-estimating only the first BatchNorm's and negating its scale, (d) (b) + (c).
With a bias-free stem conv, conv(1 - x) = conv(1) - conv(x), so (c) is exact up to the
zero-padded border; if (c) recovers the clean accuracy the key has the capacity and only
getting there (a scale crossing zero) is the update's problem. Writes DIR/inversion.json.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from adaloc.adapt import recalibrate_batchnorm
from adaloc.data import ImageSet, load_dataset, make_stages
from adaloc.evaluate import accuracy
from adaloc.keys import KeyMask
from adaloc.models import build_model
from adaloc.shifts import apply_shift
from adaloc.training import TrainConfig, fit


def _first_bn(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def main() -> dict:
    """Run the check and print/write the four accuracies."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="data")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", default="runs/inversion")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bundle = load_dataset(args.dataset, args.data_root)
    stages = make_stages(bundle, updates=1, seed=0)
    model = build_model(
        "cnn",
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    fit(model, stages[0].train, TrainConfig(epochs=args.epochs, seed=0), progress=False)
    model.to("cpu")

    def inv(d: ImageSet) -> ImageSet:
        return ImageSet(apply_shift(d.x, "invert"), d.y)

    train_inv, test_inv = inv(stages[1].train), inv(bundle.test)
    first = _first_bn(model)
    name = next(n for n, m in model.named_modules() if m is first)
    stats = torch.arange(first.num_features)
    first_only = KeyMask({f"{name}.running_mean": stats, f"{name}.running_var": stats})

    out = {"clean": accuracy(model, bundle.test), "inverted": accuracy(model, test_inv)}
    m = copy.deepcopy(model)
    recalibrate_batchnorm(m, train_inv)
    out["inverted_all_bn_stats_reestimated"] = accuracy(m, test_inv)
    m = copy.deepcopy(model)
    recalibrate_batchnorm(m, train_inv, first_only)
    with torch.no_grad():
        _first_bn(m).weight.neg_()
    out["inverted_first_bn_reestimated_scale_negated"] = accuracy(m, test_inv)
    m = copy.deepcopy(model)
    with torch.no_grad():
        _first_bn(m).weight.neg_()
    recalibrate_batchnorm(m, train_inv)
    out["inverted_all_bn_reestimated_first_scale_negated"] = accuracy(m, test_inv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "inversion.json").write_text(json.dumps(out, indent=2))
    for k, v in out.items():
        print(f"{k:<50} {100 * v:6.2f}")
    return out


if __name__ == "__main__":
    main()
