"""torchrun entry point for multi-process (multi-GPU) lock training with DDP.

    torchrun --standalone --nproc_per_node 2 -m pipelines.train_ddp \\
        --dataset digits --mode full --epochs 1 --out runs/ddp/base.safetensors
    torchrun --standalone --nproc_per_node 2 -m pipelines.train_ddp \\
        --dataset digits --mode key --init runs/ddp/base.safetensors \\
        --key runs/ddp/key.safetensors --out runs/ddp/keyed.safetensors

    torchrun --standalone --nproc_per_node 2 -m pipelines.train_ddp \\
        --dataset imagefolder:runs/images --stream --num-workers 2 --mode key ...
    python -m adaloc.shards runs/images runs/shards
    torchrun --standalone --nproc_per_node 2 -m pipelines.train_ddp \\
        --dataset shards:runs/shards --mode key ...

``--stream`` reads an ``imagefolder:PATH`` set lazily (adaloc.streaming: ImageFolder +
DataLoader workers + DistributedSampler) instead of loading it into memory; a
``shards:PATH`` set (uint8 shards made by ``python -m adaloc.shards``) is always streamed,
each rank reading its DistributedSampler-equal part in whole batches, in the rank's own
process unless ``--num-workers`` says otherwise (``adaloc.streaming.default_workers``).
``--mode full`` trains the whole network (the owner's base training); ``--mode key`` trains
only the key positions of the mask stored in ``--key`` (an adaloc key artifact). gloo on
CPU, nccl on CUDA (one process per GPU). Rank 0 writes ``--out`` (safetensors state dict)
and ``--out``.json (steps, seconds, losses, state and outside-key sha256, ranks_agree).
The tensor maths is in :mod:`adaloc.distributed`; this file only reads and writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of the DDP training entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--model", default="cnn")
    p.add_argument("--mode", choices=("full", "key"), default="full")
    p.add_argument("--init", default=None, help="state dict (safetensors) to start from")
    p.add_argument("--key", default=None, help="key artifact whose mask is trained (mode key)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-limit", type=int, default=0, help="cap on training images (0=all)")
    p.add_argument(
        "--updates",
        type=int,
        default=0,
        help="cut the data into lifecycle stages (as the flows do) and train on --stage; "
        "0 = the whole training set",
    )
    p.add_argument("--stage", type=int, default=0, help="stage index with --updates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stream",
        action="store_true",
        help="read --dataset imagefolder:PATH lazily through DataLoader workers "
        "(shards:PATH always is)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="loader processes per rank (default: 2 for image folders, 0 for shards)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    return p


def main(args: argparse.Namespace) -> dict | None:
    """Train under torchrun; rank 0 writes the state dict and a JSON report."""
    import torch
    from safetensors.torch import load_file, save

    from adaloc.artifact import atomic_write_bytes, load_key
    from adaloc.data import load_dataset, make_stages
    from adaloc.distributed import (
        fit_distributed,
        init_distributed,
        ranks_agree,
        shutdown_distributed,
    )
    from adaloc.errors import ConfigError
    from adaloc.lock import outside_key_sha256, state_sha256
    from adaloc.models import build_model
    from adaloc.training import TrainConfig

    if args.mode == "key" and not args.key:
        raise ConfigError("--mode key needs --key KEY_FILE (whose mask is trained)")
    args.stream = args.stream or args.dataset.startswith("shards:")
    if args.stream and (not args.dataset.startswith(("imagefolder:", "shards:")) or args.updates):
        raise ConfigError(
            f"--stream reads --dataset imagefolder:PATH or shards:PATH (got {args.dataset!r}) "
            "and cannot be combined with --updates"
        )
    rank, world, device = init_distributed(args.device)
    try:
        if args.stream:
            from adaloc.streaming import stream_dataset

            bundle = stream_dataset(args.dataset.partition(":")[2])
            if args.dataset.startswith("shards:") and not bundle.name.startswith("shards:"):
                raise ConfigError(f"{args.dataset}: no shards.json under train/; see adaloc.shards")
        else:
            bundle = load_dataset(args.dataset, args.data_root)
        if args.train_limit:
            keep = range(min(args.train_limit, len(bundle.train)))
            bundle.train = (
                torch.utils.data.Subset(bundle.train, list(keep))
                if args.stream
                else bundle.train.subset(torch.arange(len(keep)))
            )
        train = bundle.train
        if args.updates:
            stages = make_stages(bundle, updates=args.updates, seed=args.seed)
            train = stages[args.stage].train
        torch.manual_seed(args.seed)
        model = build_model(
            args.model,
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            image_size=bundle.image_size,
        )
        if args.init:
            model.load_state_dict(load_file(args.init))
        mask = load_key(args.key).mask if args.mode == "key" else None
        before = outside_key_sha256(model, mask) if mask is not None else None
        cfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            device=str(device),
        )
        report = fit_distributed(
            model, train, cfg, mask=mask, device=device, num_workers=args.num_workers
        )
        agree = ranks_agree(model)
        if rank != 0:
            return None
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        out = Path(args.out)
        atomic_write_bytes(out, save(state))
        summary = {
            "world_size": world,
            "backend": "nccl" if device.type == "cuda" else "gloo",
            "mode": args.mode,
            "stream": args.stream,
            "steps": report.steps,
            "seconds": report.seconds,
            "losses": report.losses,
            "state_sha256": state_sha256(state),
            "ranks_agree": agree,
            "outside_key_sha256_before": before,
            "outside_key_sha256_after": outside_key_sha256(model, mask) if mask else None,
        }
        atomic_write_bytes(Path(f"{out}.json"), json.dumps(summary, indent=2).encode())
        print(json.dumps(summary))
        return summary
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
