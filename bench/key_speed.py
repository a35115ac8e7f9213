"""Samples/s of a key-only epoch next to a full fine-tuning epoch, side by side in one run.

    python bench/key_speed.py --dataset fashion-mnist --images 4096 --repeats 3

Builds the lifecycle CNN, trains it one epoch on the base stage, selects the default key
(KeySpec defaults, saliency) and alternates one key-only epoch (UpdateRecipe's optimizer)
with one full fine-tuning epoch (SGD, the base's settings) on the same images; the best of
``--repeats`` each counts (the machine is shared). Writes DIR/key_speed.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lifecycle import measure_speed

from adaloc.adapt import UpdateRecipe
from adaloc.data import load_dataset, make_stages
from adaloc.keys import KeySpec, select_key
from adaloc.models import build_model
from adaloc.training import TrainConfig, fit


def main() -> dict:
    """Measure and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/key_speed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = load_dataset(args.dataset, args.data_root)
    stages = make_stages(bundle, updates=1, seed=0)
    model = build_model(
        "cnn",
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    base_cfg = TrainConfig(epochs=1, seed=0, device="cpu")
    fit(model, stages[0].train.subset(torch.arange(args.images)), base_cfg, progress=False)
    model.to("cpu")
    mask = select_key(model, KeySpec(selection="saliency"), data=stages[0].train)
    out = measure_speed(
        model,
        mask,
        stages[1].train,
        UpdateRecipe(),
        base_cfg,
        repeats=args.repeats,
        limit=args.images,
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "key_speed.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
