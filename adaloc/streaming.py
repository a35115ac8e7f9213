"""Datasets that don't fit in memory: image folders or sample shards read lazily.

Two sources, one interface (float32 ``[C, H, W]`` in [0, 1] batches, int64 labels, the
``PATH/train`` + ``PATH/test`` layout of ``load_dataset("imagefolder:PATH")``):

- image folders: torchvision's ``DatasetFolder`` (already a dependency, made for the
  ``root/<class>/<image>`` layout, lists file paths only and decodes one image per
  ``__getitem__``; PNGs through libpng via ``torchvision.io``) under a ``DataLoader`` with
  worker processes; memory is bounded by ``batch_size * prefetch_factor * workers`` samples;
- uint8 sample shards (:mod:`adaloc.shards`, made from a folder with ``python -m
  adaloc.shards``): no decoding, whole batches per worker, bounded by a few shards.

The in-memory path stays the fast default for small sets; this one takes over when a set
outgrows RAM. Entry points: :func:`stream_dataset`, :func:`make_loader`, :func:`fit_stream`
(full or key-only training, through :func:`adaloc.training.run_loop`), :func:`key_sample` (a
bounded sample for saliency key selection), and :mod:`adaloc.evaluate` /
:mod:`adaloc.distributed`, which accept a loader or Dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from adaloc.data import IMAGE_SUFFIXES, ImageSet
from adaloc.device import best_device
from adaloc.errors import ConfigError, DatasetError
from adaloc.keys import KeyMask
from adaloc.shards import MANIFEST, ShardLoader, ShardSet, ShardStream
from adaloc.training import KeyGuard, TrainConfig, TrainReport, run_loop

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class _DecodeImage:
    """PIL file -> float32 [C, H, W] in [0, 1], in one mode and size (picklable for workers)."""

    def __init__(self, mode: str, size: tuple[int, int]):
        self.mode, self.size = mode, size

    def __call__(self, path: str) -> torch.Tensor:
        array = self._fast_png(path) if path.lower().endswith(".png") else None
        if array is None:
            array = self._pil(path)
        return torch.from_numpy(array).float().div_(255)

    def _fast_png(self, path: str) -> np.ndarray | None:
        """libpng through torchvision.io (~3x faster than PIL on small images) when the file
        is 8-bit with the wanted channels and size; None sends it to PIL, which also names
        the error of a broken file."""
        from torchvision.io import ImageReadMode, decode_png

        try:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            img = decode_png(data, mode=ImageReadMode.UNCHANGED)
        except (OSError, RuntimeError, ValueError):
            return None
        channels = 1 if self.mode == "L" else 3
        if img.dtype != torch.uint8 or tuple(img.shape) != (channels, *self.size):
            return None
        return img.numpy()

    def _pil(self, path: str) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
                if img.size != (self.size[1], self.size[0]):  # PIL sizes are (W, H)
                    img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError) as err:  # truncated data surfaces only on decode
            raise DatasetError(f"cannot decode image {path}: {err}") from err
        return array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy()


@dataclass
class StreamBundle:
    """A lazily read image folder: train/test datasets plus what a model builder needs."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    classes: list[str]


def image_folder(
    split_dir: str | Path, *, mode: str | None = None, image_size: tuple[int, int] | None = None
) -> Dataset:
    """``split_dir/<class>/*.png|jpg`` as a torchvision ``DatasetFolder`` (ImageFolder's base,
    which takes our suffixes) that decodes on access.

    ``mode`` ("L" or "RGB") and ``image_size`` (H, W) default to the first image's, read from
    its header only (a 100k-image folder is never scanned for sizes).
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import DatasetFolder

    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(f"image folder needs {split_dir}/ with one subfolder per class")
    try:
        ds = DatasetFolder(
            str(split_dir), loader=lambda p: p, extensions=IMAGE_SUFFIXES, allow_empty=False
        )
    except (FileNotFoundError, RuntimeError) as err:  # torchvision's "no class/no file" errors
        raise DatasetError(f"{split_dir}: {err}") from err
    if mode is None or image_size is None:
        first = ds.samples[0][0]
        try:
            with Image.open(first) as img:
                mode = mode or ("L" if img.mode in _GRAY_MODES else "RGB")
                image_size = image_size or (img.height, img.width)
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"cannot read image {first}: {err}") from err
    ds.loader = _DecodeImage(mode, tuple(image_size))
    return ds


def stream_dataset(path: str | Path, *, image_size: int | None = None) -> StreamBundle:
    """``PATH/train`` and ``PATH/test``, read lazily: shard folders (``adaloc.shards``, when
    ``PATH/train/shards.json`` exists) or image folders (the layout of
    ``load_dataset("imagefolder:PATH")``)."""
    path = Path(path)
    if (path / "train" / MANIFEST).is_file():
        return _shard_bundle(path, image_size)
    size = None if image_size is None else (image_size, image_size)
    train = image_folder(path / "train", image_size=size)
    mode, size = train.loader.mode, train.loader.size
    test = image_folder(path / "test", mode=mode, image_size=size)
    if train.classes != test.classes:
        raise DatasetError(
            f"{path}: train/ and test/ class folders differ: {train.classes} vs {test.classes}"
        )
    return StreamBundle(
        f"imagefolder:{path}", train, test, len(train.classes), 1 if mode == "L" else 3, size,
        list(train.classes),
    )  # fmt: skip


def _shard_bundle(path: Path, image_size: int | None) -> StreamBundle:
    train, test = ShardSet(path / "train"), ShardSet(path / "test")
    if (train.classes, train.shape) != (test.classes, test.shape):
        raise DatasetError(
            f"{path}: train/ and test/ shards differ: {train.classes} {train.shape} vs "
            f"{test.classes} {test.shape}"
        )
    channels, h, w = train.shape
    if image_size is not None and (h, w) != (image_size, image_size):
        raise DatasetError(
            f"{path}: shards hold {h}x{w} images, not {image_size}x{image_size}; make shards "
            f"at that size (`python -m adaloc.shards SRC OUT --image-size {image_size}`)"
        )
    return StreamBundle(
        f"shards:{path}", train, test, len(train.classes), channels, (h, w), train.classes
    )


IMAGE_FOLDER_WORKERS = 2


def default_workers(dataset: Dataset) -> int:
    """Loader processes when none are asked for: 0 for shard sets, 2 otherwise.

    A shard batch is one gather from a window already in memory (~0.5 ms for 64 images), so
    a worker process only adds the cost of moving each batch across the process boundary
    and takes a core from the trainer: on an idle 2-core machine shards read in the trainer
    ran at 1.07x the in-memory path's samples/s and through one worker at 0.82x
    (``bench/streaming.py``). Image folders decode every image (~22 ms per 64 PNGs), which
    is worth moving off the trainer.
    """
    return 0 if isinstance(dataset, ShardSet) else IMAGE_FOLDER_WORKERS


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
    sampler: Sampler | None = None,
) -> DataLoader | ShardLoader:
    """A loader of ``(x, y)`` batches over ``dataset`` with ``num_workers`` processes
    (``None``: :func:`default_workers`).

    Seeded shuffling (or ``sampler``, e.g. a DistributedSampler). The last batch is dropped
    only when it would hold a lone sample (BatchNorm cannot train on one). A ShardSet gets a
    :class:`~adaloc.shards.ShardLoader` (whole batches from each worker; a
    DistributedSampler's rank, world, seed and epoch are honoured, its order is the shards').
    """
    n = len(sampler) if sampler is not None else len(dataset)
    if n == 0:
        raise DatasetError("dataset is empty: nothing to load")
    if num_workers is None:
        num_workers = default_workers(dataset)
    if isinstance(dataset, ShardSet) and isinstance(sampler, (type(None), DistributedSampler)):
        return _shard_loader(dataset, batch_size, shuffle, seed, num_workers, sampler)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed) if sampler is None else None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # no re-fork per epoch
        drop_last=n > 1 and n % batch_size == 1,
    )


def _shard_loader(dataset, batch_size, shuffle, seed, num_workers, sampler) -> ShardLoader:
    if sampler is None:
        stream = ShardStream(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed)
        return ShardLoader(stream, num_workers=num_workers)
    if not sampler.drop_last and len(dataset) % sampler.num_replicas:
        raise ConfigError(
            f"{len(dataset)} shard samples do not split evenly over {sampler.num_replicas} "
            "ranks; use DistributedSampler(drop_last=True)"
        )
    stream = ShardStream(
        dataset,
        batch_size=batch_size,
        shuffle=sampler.shuffle,
        seed=sampler.seed,
        rank=sampler.rank,
        world=sampler.num_replicas,
    )
    return ShardLoader(stream, num_workers=num_workers, epoch_source=sampler)


def fit_stream(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    *,
    mask: KeyMask | None = None,
    desc: str = "train-stream",
    progress: bool = True,
) -> TrainReport:
    """Train ``model`` on batches from ``loader``; with ``mask`` only the key changes.

    The loader's own batch size and order are used (``cfg.batch_size`` is not); everything
    else, including the key-only guarantee, is :func:`adaloc.training.run_loop`'s.
    """
    device = best_device(cfg.device)
    model.to(device)
    torch.manual_seed(cfg.seed)
    return run_loop(
        model,
        cfg,
        forward=model,
        epoch_batches=lambda: loader,
        steps_per_epoch=len(loader),
        device=device,
        guard=KeyGuard(model, mask) if mask is not None else None,
        desc=desc,
        progress=progress,
    )


def key_sample(dataset: Dataset, *, n: int = 1024, seed: int = 0) -> ImageSet:
    """A seeded random sample of ``n`` images as an in-memory ImageSet, for data-aware key
    selection (``select_key(..., data=key_sample(ds))``): saliency reads only a few batches,
    so a bounded sample gives it what it needs without loading the set."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[: min(n, len(dataset))]
    items = [dataset[int(i)] for i in idx]
    return ImageSet(torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items]))


def write_image_folder(
    data: ImageSet, folder: str | Path, *, classes: list[str] | None = None, count: int = 0
) -> int:
    """Write ``data`` as ``folder/<class>/<k>.png``; ``count`` > len(data) cycles through it
    (file k is image k mod len). Returns the number of files; for tests and benchmarks."""
    from PIL import Image
    from tqdm.auto import tqdm

    folder = Path(folder)
    names = classes or [f"{c:02d}" for c in range(int(data.y.max()) + 1)]
    for c in names:
        (folder / c).mkdir(parents=True, exist_ok=True)
    pixels = (data.x * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    total = count or len(data)
    width = max(6, int(math.log10(max(total, 1))) + 1)
    for k in tqdm(range(total), desc=f"write {folder.name}", unit="img", leave=False):
        i = k % len(data)
        array = pixels[i]
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
        Image.fromarray(array).save(folder / names[int(data.y[i])] / f"{k:0{width}d}.png")
    return total
