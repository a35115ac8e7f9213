"""How tight is the layer-wise logit-change bound? Key removal and one key-only update.

    python bench/bounds.py --dataset digits --model cnn --out runs/bounds

Trains the owner's network on the base stage, locks it with the library defaults, runs one
key-only update (the library's update recipe) on update stage 1, and compares the bound of
``adaloc.bounds`` with the measured ``||logits_b - logits_a||`` on every test image.
Writes DIR/bounds.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path

import torch

from adaloc.adapt import adapt
from adaloc.bounds import bound_report
from adaloc.data import load_dataset, make_stages
from adaloc.keys import KeySpec, select_key
from adaloc.lock import lock, unlock
from adaloc.models import build_model
from adaloc.training import TrainConfig, fit


def main(args: argparse.Namespace) -> dict:
    """Run and write DIR/bounds.json; returns the dict."""
    torch.set_num_threads(1)
    bundle = load_dataset(args.dataset, args.data_root)
    stages = make_stages(bundle, updates=1, seed=0)
    make = functools.partial(
        build_model,
        args.model,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    torch.manual_seed(0)
    owner = make()
    fit(owner, stages[0].train, TrainConfig(epochs=args.epochs, device="cpu"), progress=False)
    mask = select_key(owner, KeySpec(), data=stages[0].train)
    base, key = lock(owner, mask)
    authorized = unlock(base, key)
    updated = copy.deepcopy(authorized)
    adapt(updated, stages[1].train, stages[1].val, mask=mask, device="cpu", progress=False)
    out = {
        "dataset": args.dataset,
        "model": args.model,
        "key_removal": bound_report(authorized, base, bundle.test),
        "key_only_update": bound_report(authorized, updated, bundle.test),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bounds.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="data")
    p.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="runs/bounds")
    main(p.parse_args())
