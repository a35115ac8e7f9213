"""Sample shards for streaming: an image set as fixed-size uint8 ``.npy`` shards plus a manifest.

Why this format and not a library: the two made for it, ``webdataset`` (tar shards) and
``litdata`` (chunked binary shards), are not dependencies of this project, and for images
that are already decoded the format is small enough to own: one ``.npy`` file of raw uint8
pixels ``[n, C, H, W]`` and one of int64 labels per shard, read with numpy alone, plus
``shards.json`` (format version, classes, shape, and the count and sha256 of every file).
No decoding at read time is the point: a PNG folder spends ~0.1-0.4 ms of CPU per image on
decoding in the loader workers, which a 2-core trainer cannot hide. The layout is the one
``webdataset``/``litdata`` use (shards shuffled in order, samples shuffled in a buffer of a
few shards, ranks and workers dealt disjoint parts), so moving to either is a change of
reader, not of design; for object storage (S3) streaming ``webdataset`` would be the one.

Reading (:class:`ShardStream`, a ``torch`` IterableDataset): each epoch the shard order is
permuted (seed, epoch), ``mix`` shards at a time are read whole (plain reads, not mmap, so
resident memory is ``mix`` shards per worker whatever the set's size), their sha256 checked,
their samples permuted together, and whole batches are handed over, so the DataLoader moves
one tensor per batch, not one per sample. Global position ``p`` goes to rank ``p % world``
(``N // world`` samples each, like ``DistributedSampler(drop_last=True)``); batch ``b`` of a
rank is built by worker ``b % num_workers``, which is the order the DataLoader yields them
in, so the batches do not depend on the worker count. :class:`ShardSet` is the map-style view
(``len``, ``set[i]``) for bounded random samples (saliency key selection).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from adaloc.errors import ConfigError, DatasetError

SHARD_FORMAT = "adaloc-shards"
SHARD_FORMAT_VERSION = 1
MANIFEST = "shards.json"
DEFAULT_SHARD_MIB = 8
DEFAULT_MIX = 4
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass(frozen=True)
class ShardFile:
    """One shard: ``x`` (uint8 [count, C, H, W]) and ``y`` (int64 [count]) ``.npy`` files."""

    x: str
    y: str
    count: int
    x_sha256: str
    y_sha256: str


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an ``.npy`` file, from its header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f".npy version {version} is not one numpy writes here")
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as err:
        raise DatasetError(f"shard file {path} is not a readable .npy file: {err}") from err
    if fortran:
        raise DatasetError(f"shard file {path} is Fortran-ordered; expected C order")
    return shape, dtype, offset


class ShardSet(Dataset):
    """A shard folder (``DIR/shards.json`` + ``.npy`` shards) as a map-style Dataset.

    Opening checks the manifest and every shard's header and size (a truncated or foreign
    file is a DatasetError here, before any training); the sha256 of a shard is checked when
    :class:`ShardStream` reads it whole. ``set[i]`` reads one record (float32 [C, H, W] in
    [0, 1], int label), for bounded random samples.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta = self._manifest()
        self.classes: list[str] = list(meta["classes"])
        self.shape: tuple[int, int, int] = tuple(int(s) for s in meta["shape"])  # C, H, W
        self.shards = [ShardFile(**s) for s in meta["shards"]]
        self.counts = np.array([s.count for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.offsets = [self._check_shard(s) for s in self.shards]

    def _manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            raise DatasetError(
                f"{self.root} has no {MANIFEST}; make shards with `python -m "
                "adaloc.shards IMAGE_FOLDER OUT`"
            )
        try:
            meta = json.loads(path.read_text())
            ok = meta.get("format") == SHARD_FORMAT and len(meta["shape"]) == 3
            ok = ok and isinstance(meta["shards"], list) and isinstance(meta["classes"], list)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DatasetError(f"{path} is not a shard manifest: {err}") from err
        if not ok:
            raise DatasetError(f"{path} is not a {SHARD_FORMAT} manifest (format/shape/shards)")
        if meta.get("format_version", 0) > SHARD_FORMAT_VERSION:
            raise DatasetError(
                f"{path} has format_version {meta['format_version']}; this adaloc reads up "
                f"to {SHARD_FORMAT_VERSION}: upgrade adaloc"
            )
        if not meta["shards"]:
            raise DatasetError(f"{path} lists no shards: the set is empty")
        return meta

    def _check_shard(self, s: ShardFile) -> tuple[int, int]:
        """Header and exact size of both files; returns their data offsets."""
        offsets = []
        files = ((s.x, (s.count, *self.shape), np.uint8), (s.y, (s.count,), np.int64))
        for name, shape, dtype in files:
            path = self.root / name
            if not path.is_file():
                raise DatasetError(f"shard file {path} is missing (listed in {MANIFEST})")
            got_shape, got_dtype, offset = _npy_header(path)
            if got_shape != shape or got_dtype != np.dtype(dtype):
                raise DatasetError(
                    f"shard file {path} holds {got_dtype} {got_shape}; the manifest says "
                    f"{np.dtype(dtype)} {shape}"
                )
            size = path.stat().st_size
            want = offset + math.prod(shape) * np.dtype(dtype).itemsize
            if size != want:
                raise DatasetError(
                    f"shard file {path} is {size} bytes, expected {want}: truncated or "
                    "overwritten; re-make or re-pull the shards"
                )
            offsets.append(offset)
        return offsets[0], offsets[1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def record_bytes(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        row, s = i - int(self.starts[k]), self.shards[k]
        x_off, y_off = self.offsets[k]
        with open(self.root / s.x, "rb") as f:
            f.seek(x_off + row * self.record_bytes)
            x = np.frombuffer(f.read(self.record_bytes), dtype=np.uint8).reshape(self.shape)
        with open(self.root / s.y, "rb") as f:
            f.seek(y_off + row * 8)
            y = int(np.frombuffer(f.read(8), dtype="<i8")[0])
        return torch.from_numpy(x.copy()).float().div_(255), y

    def read_shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``k`` whole: (uint8 [n, C, H, W], int64 [n]), sha256-checked."""
        s = self.shards[k]
        out = []
        x_off, y_off = self.offsets[k]
        files = ((s.x, s.x_sha256, x_off, np.uint8), (s.y, s.y_sha256, y_off, np.int64))
        for name, digest, offset, dtype in files:
            data = (self.root / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise DatasetError(
                    f"shard file {self.root / name} does not match the sha256 in {MANIFEST}: "
                    "corrupted; re-make or re-pull the shards"
                )
            out.append(np.frombuffer(data, dtype=dtype, offset=offset))
        x, y = out
        if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
            raise DatasetError(f"shard {s.y} has labels outside 0..{len(self.classes) - 1}")
        return x.reshape(s.count, *self.shape), y


class ShardStream(IterableDataset):
    """One rank's epoch of a :class:`ShardSet` as whole float32 batches (see module doc).

    ``shuffle``: shard order and samples within ``mix`` shards permuted by (seed, epoch);
    set ``epoch`` before each pass (:class:`ShardLoader` does). The last batch is dropped only
    when it would hold a lone sample (as :func:`adaloc.streaming.make_loader` does).
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        mix: int = DEFAULT_MIX,
    ):
        if batch_size < 1 or mix < 1 or not 0 <= rank < world:
            raise ConfigError(
                f"batch_size {batch_size} and mix {mix} must be >= 1, rank {rank} in 0..{world - 1}"
            )
        self.shards, self.batch_size, self.shuffle = shards, batch_size, shuffle
        self.seed, self.rank, self.world, self.mix, self.epoch = seed, rank, world, mix, 0
        self.per_rank = len(shards) // world if world > 1 else len(shards)
        if self.per_rank == 0:
            raise DatasetError(f"{len(shards)} samples cannot be split over {world} ranks")
        n, b = self.per_rank, batch_size
        self.batches = math.ceil(n / b) - (1 if n > 1 and n % b == 1 else 0)

    def __len__(self) -> int:
        return self.batches

    @property
    def classes(self) -> list[str]:
        return self.shards.classes

    def windows(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per window of ``mix`` shards: (shard ids, this rank's window-local sample indices
        in epoch order, their batch numbers)."""
        order = np.arange(len(self.shards.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        pos = 0
        for w, start in enumerate(range(0, len(order), self.mix)):
            ids = order[start : start + self.mix]
            m = int(self.shards.counts[ids].sum())
            local = np.arange(m)
            if self.shuffle:
                local = np.random.default_rng([self.seed, self.epoch, w]).permutation(m)
            g = np.arange(pos, pos + m)
            pos += m
            mine = (g % self.world == self.rank) & (g // self.world < self.per_rank)
            batch = (g[mine] // self.world) // self.batch_size
            keep = batch < self.batches
            yield ids, local[mine][keep], batch[keep]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        pending_b, pending = -1, []
        for ids, local, batch in self.windows():
            sel = batch % nw == wid
            if not sel.any():
                continue
            local, batch = local[sel], batch[sel]
            xs, ys = zip(*(self.shards.read_shard(int(k)) for k in ids), strict=True)
            ends = np.cumsum([len(y) for y in ys])
            which = np.searchsorted(ends, local, side="right")
            row = local - np.concatenate([[0], ends[:-1]])[which]
            x = np.empty((len(local), *self.shards.shape), dtype=np.uint8)
            y = np.empty(len(local), dtype=np.int64)
            for j in range(len(ids)):
                hit = which == j
                x[hit], y[hit] = xs[j][row[hit]], ys[j][row[hit]]
            del xs, ys  # the window's shards go before the next window is read
            cuts = np.flatnonzero(np.diff(batch)) + 1
            for part in np.split(np.arange(len(batch)), cuts):
                b = int(batch[part[0]])
                if b != pending_b and pending:
                    yield _to_batch(pending)
                    pending = []
                pending_b = b
                pending.append((x[part], y[part]))
        if pending:
            yield _to_batch(pending)


def _to_batch(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    # same values as the image-folder path and load_dataset: uint8 / 255 in float32
    return torch.from_numpy(x).float().div_(255), torch.from_numpy(y)


class ShardLoader:
    """A DataLoader over a :class:`ShardStream` (workers hand whole batches); each ``iter``
    is one epoch. The epoch number comes from ``epoch_source.epoch`` when given (a
    DistributedSampler on which DDP training calls ``set_epoch``), else it counts up."""

    def __init__(self, stream: ShardStream, *, num_workers: int = 1, epoch_source=None):
        self.stream, self.epoch_source, self._next_epoch = stream, epoch_source, 0
        # Not persistent: workers are forked per epoch so they see the new epoch number.
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers)

    @property
    def dataset(self) -> ShardStream:
        return self.stream

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        if self.epoch_source is not None:
            self.stream.epoch = int(self.epoch_source.epoch)
        else:
            self.stream.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return plain_errors(self.loader)


def plain_errors(batches):
    """Iterate ``batches`` (a DataLoader), re-raising a DatasetError from a worker process as
    its own one-line message: the DataLoader re-raises it with the worker's whole traceback
    in the message, which is not what a user should read."""
    try:
        yield from batches
    except DatasetError as err:
        lines = str(err).strip().splitlines()
        if len(lines) < 2 or not lines[0].startswith("Caught DatasetError"):
            raise
        raise DatasetError(lines[-1].split("DatasetError: ", 1)[-1]) from None


def write_shards(
    source: Dataset,
    out: str | Path,
    *,
    classes: list[str],
    shard_size: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    progress: bool = True,
) -> dict:
    """Write ``source`` (a Dataset of (float [C, H, W] in [0, 1], label)) as shards in
    ``out`` (which must not exist), samples in a seeded random order, ``shard_size`` samples
    per shard (0: ~8 MiB). Written to a temporary folder renamed at the end: on any error
    nothing is left at ``out``. Returns the manifest."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists():
        raise DatasetError(f"{out} already exists; shards are written to a new folder")
    if len(source) == 0:
        raise DatasetError("the source set is empty: nothing to shard")
    x0, _ = source[0]
    shape = tuple(int(s) for s in x0.shape)
    size = shard_size or max(1, DEFAULT_SHARD_MIB * 2**20 // math.prod(shape))
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(source, batch_size=size, sampler=order.tolist(), num_workers=num_workers)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    shards = []
    try:
        batches = tqdm(
            plain_errors(loader), desc=f"shard {out.name}", total=len(loader), disable=not progress
        )
        for k, (x, y) in enumerate(batches):
            if tuple(x.shape[1:]) != shape:
                raise DatasetError(f"sample shapes differ: {tuple(x.shape[1:])} vs {shape}")
            pixels = (x * 255).round_().clamp_(0, 255).to(torch.uint8).numpy()
            entry = {"count": len(y)}
            for part, array in (("x", pixels), ("y", y.numpy().astype("<i8"))):
                name = f"{k:05d}.{part}.npy"
                np.save(tmp / name, array)
                entry[part] = name
                entry[f"{part}_sha256"] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
            shards.append(entry)
        meta = {
            "format": SHARD_FORMAT,
            "format_version": SHARD_FORMAT_VERSION,
            "classes": list(classes),
            "shape": list(shape),
            "count": len(source),
            "seed": seed,
            "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def convert_image_folder(
    src: str | Path,
    out: str | Path,
    *,
    shard_size: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    image_size: int | None = None,
    progress: bool = True,
) -> dict:
    """``src/train`` and ``src/test`` image folders -> ``out/train`` and ``out/test`` shards
    (written next to ``out`` and renamed in one step: on error nothing is left at ``out``).
    Returns ``{"train": n, "test": n}``."""
    from adaloc.streaming import stream_dataset

    out = Path(out)
    if out.exists():
        raise DatasetError(f"{out} already exists; shards are written to a new folder")
    bundle = stream_dataset(src, image_size=image_size)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        counts = {}
        for split, ds in (("train", bundle.train), ("test", bundle.test)):
            meta = write_shards(
                ds,
                tmp / split,
                classes=bundle.classes,
                shard_size=shard_size,
                seed=seed,
                num_workers=num_workers,
                progress=progress,
            )
            counts[split] = meta["count"]
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m adaloc.shards IMAGE_FOLDER OUT``: make shards; errors are one line."""
    p = argparse.ArgumentParser(
        prog="python -m adaloc.shards", description=convert_image_folder.__doc__
    )
    p.add_argument("src", help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("out", help="new folder for the shards (train/, test/)")
    p.add_argument("--shard-size", type=int, default=0, help="samples per shard (0: ~8 MiB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--image-size", type=int, default=None, help="resize to this square side")
    args = p.parse_args(argv)
    try:
        counts = convert_image_folder(
            args.src,
            args.out,
            shard_size=args.shard_size,
            seed=args.seed,
            num_workers=args.workers,
            image_size=args.image_size,
        )
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
