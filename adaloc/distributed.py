"""Data-parallel (DDP) training for multi-GPU lock training, launched with ``torchrun``.

The same two modes as :func:`adaloc.training.fit`: full training (the base) and key-only
training that cannot move anything outside the key. Key-only DDP keeps the guarantee by the
same construction: :class:`~adaloc.training.KeyGuard` masks gradients *before* DDP's
all-reduce (tensor hooks fire before the reducer sees a gradient), only keyed parameters are
registered with DDP, and every non-key value is written back after each step. Every rank
starts from the same weights (DDP broadcasts rank 0's at wrap time) and walks its own
shard of one shared, seeded permutation, so the ranks stay identical. A ``torch`` Dataset
(:func:`adaloc.streaming.image_folder` or an :class:`adaloc.shards.ShardSet`, not an
in-memory ImageSet) is read through a
DataLoader with a ``DistributedSampler`` instead: the same equal, disjoint per-rank shards,
reshuffled per epoch with ``set_epoch``.

Backend: ``gloo`` on CPU, ``nccl`` on CUDA. Run ``torchrun --nproc_per_node 2 -m
pipelines.train_ddp ...``; this module holds the tensor maths, the entry point only I/O.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adaloc.data import ImageSet
from adaloc.device import best_device
from adaloc.errors import ConfigError
from adaloc.keys import KeyMask
from adaloc.training import KeyGuard, TrainConfig, TrainReport, index_epochs, run_loop


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_*); returns
    ``(rank, world_size, device)``. One process per GPU on CUDA (LOCAL_RANK picks it)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "distributed training needs torchrun's environment (RANK, WORLD_SIZE); "
            "launch with `torchrun --nproc_per_node N ...`"
        )
    dev = best_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(dev))
    return dist.get_rank(), dist.get_world_size(), dev


def shutdown_distributed() -> None:
    """Leave the process group (safe to call when it was never joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_batches(n: int, batch_size: int, g: torch.Generator, rank: int, world: int):
    """Per-rank index batches: one seeded permutation shared by all ranks, dealt round-robin
    and cut to equal length so every rank takes the same number of steps (DDP needs it)."""
    order = torch.randperm(n, generator=g)
    per_rank = n // world
    mine = order[rank::world][:per_rank]
    for start in range(0, per_rank, batch_size):
        yield mine[start : start + batch_size]


def sharded_loader(train, cfg: TrainConfig, rank: int, world: int, num_workers: int | None):
    """(epoch factory, steps per epoch) over a Dataset through a DistributedSampler."""
    from torch.utils.data.distributed import DistributedSampler

    from adaloc.streaming import make_loader

    sampler = DistributedSampler(
        train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    loader = make_loader(train, batch_size=cfg.batch_size, sampler=sampler, num_workers=num_workers)
    epoch = iter(range(cfg.epochs))

    def epoch_batches():
        sampler.set_epoch(next(epoch))  # a new shared order each epoch, same on every rank
        return loader

    return epoch_batches, len(loader)


def fit_distributed(
    model: nn.Module,
    train,
    cfg: TrainConfig,
    *,
    mask: KeyMask | None = None,
    device: torch.device | None = None,
    num_workers: int | None = None,
    desc: str = "train-ddp",
    progress: bool = True,
) -> TrainReport:
    """Train ``model`` on ``train`` with DDP across the current process group; with ``mask``
    only the key changes. ``train`` is an in-memory ImageSet (index shards) or any Dataset
    (streamed by ``num_workers`` loader processes per rank; ``None``: 0 for shards, 2 for
    image folders, :func:`adaloc.streaming.default_workers`). ``cfg.batch_size`` is per rank.
    Returns rank-local timings."""
    if not dist.is_initialized():
        raise ConfigError("fit_distributed needs a process group; call init_distributed() first")
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(train) < world:
        raise ConfigError(f"training set of {len(train)} images is smaller than {world} ranks")
    dev = device or best_device(cfg.device)
    model.to(dev)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    # KeyGuard first: it turns requires_grad off outside the key, so DDP registers (and
    # all-reduces) only keyed parameters, and its masking hooks run before the reduction.
    guard = KeyGuard(model, mask) if mask is not None else None
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if isinstance(train, ImageSet):
        epoch_batches = index_epochs(
            train, lambda: shard_batches(len(train), cfg.batch_size, g, rank, world)
        )
        steps = math.ceil((len(train) // world) / cfg.batch_size)
    else:
        epoch_batches, steps = sharded_loader(train, cfg, rank, world, num_workers)
    report = run_loop(
        model,
        cfg,
        forward=ddp,
        epoch_batches=epoch_batches,
        steps_per_epoch=steps,
        device=dev,
        guard=guard,
        desc=desc,
        progress=progress and rank == 0,
    )
    # each rank's last forward updated its own BatchNorm statistics: take rank 0's
    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    return report


def ranks_agree(model: nn.Module) -> bool:
    """True when every rank holds bit-identical weights and buffers (compares sha256)."""
    from adaloc.lock import state_sha256

    mine = state_sha256(model)
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return all(s == mine for s in gathered)
