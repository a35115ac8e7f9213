"""Datasets as in-memory image tensors, and the lifecycle stages (base + K updates) cut from them.

Loaders for each source live in small private functions; `load_dataset` dispatches on the name.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaloc.errors import ConfigError, DatasetError
from adaloc.shifts import SHIFTS, apply_shift

DATASET_NAMES = (
    "fashion-mnist",
    "digits",
    "cifar100",
    "flowers102",
    "caltech256",
    "imagefolder:PATH",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Default square side per torchvision set: CIFAR is natively 32; the others vary, 64 keeps RAM sane.
TORCHVISION_SIZES = {"cifar100": 32, "flowers102": 64, "caltech256": 64}
# What torchvision expects inside root/<name>, for the "where to put the files" message.
TORCHVISION_LAYOUT = {
    "cifar100": "cifar-100-python/{train,test,meta}",
    "flowers102": "flowers-102/{jpg/,imagelabels.mat,setid.mat}",
    "caltech256": "caltech256/256_ObjectCategories/<class>/",
}
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageSet:
    """Images `x` float32 [N, C, H, W] in [0, 1] with int64 labels `y` [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise DatasetError(
                f"ImageSet.x must be float32 [N, C, H, W]; got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise DatasetError(
                f"ImageSet.y must be int64 [N]; got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if len(self.x) != len(self.y):
            raise DatasetError(f"ImageSet has {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor | Sequence[int]) -> ImageSet:
        """Return the images and labels at `idx` (a new ImageSet)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(self.x[idx], self.y[idx])


@dataclass
class DatasetBundle:
    """A loaded dataset: train/test ImageSets plus what a model builder needs to fit it."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    classes: list[str]


@dataclass
class Stage:
    """One lifecycle stage: index 0 is the base (pre-training), 1..K are key updates."""

    name: str
    index: int
    train: ImageSet
    val: ImageSet
    test: ImageSet
    shifted: bool
    shift: str | None


# ---------------------------------------------------------------- IDX (Fashion-MNIST)
def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a numpy array; DatasetError if malformed."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DatasetError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"IDX file {path} has {len(raw)} bytes; dims {dims} need {expected} "
            "(truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(root: Path) -> DatasetBundle:
    folder = root / "fashion-mnist"
    hint = (
        "install with `apt-get install dataset-fashion-mnist` "
        f"or put the four IDX files in {folder}"
    )
    found = {stem: _find_idx(folder, stem) for stem in FASHION_MNIST_FILES}
    if not any(found.values()):
        # Fill an empty data root from the Debian package so the default needs no download.
        if not all(_find_idx(DEBIAN_FASHION_MNIST, s) for s in FASHION_MNIST_FILES):
            raise DatasetError(
                f"Fashion-MNIST not found in {folder} nor {DEBIAN_FASHION_MNIST}; {hint}"
            )
        folder.mkdir(parents=True, exist_ok=True)
        for stem in FASHION_MNIST_FILES:
            source = _find_idx(DEBIAN_FASHION_MNIST, stem)
            shutil.copy2(source, folder / source.name)
        found = {stem: _find_idx(folder, stem) for stem in FASHION_MNIST_FILES}
    missing = [stem for stem, p in found.items() if p is None]
    if missing:
        raise DatasetError(f"Fashion-MNIST in {folder} lacks {', '.join(missing)}; {hint}")

    def split(images: str, labels: str) -> ImageSet:
        x, y = read_idx(found[images]), read_idx(found[labels])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"{found[images]} {x.shape} and {found[labels]} {y.shape} do not "
                "form an image set [N, H, W] + [N]"
            )
        return ImageSet(
            torch.from_numpy(x).float().div_(255).unsqueeze(1), torch.from_numpy(y).long()
        )

    train, test = split(*FASHION_MNIST_FILES[:2]), split(*FASHION_MNIST_FILES[2:])
    return DatasetBundle("fashion-mnist", train, test, 10, 1, (28, 28), list(FASHION_MNIST_CLASSES))


# ---------------------------------------------------------------- scikit-learn digits
def _stratified_split(labels: Sequence[int], test_fraction: float, seed: int):
    """Fixed per-class split (train_idx, test_idx) so every run and site sees the same one."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Read the CSV bundled with scikit-learn without importing it: `import sklearn` drags in
    # scipy, pandas and pyarrow (~8 s of CPU here) for a 1797-row table.
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # layout changed: take the public, slower path

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _load_digits() -> DatasetBundle:
    images, labels = _digits_arrays()
    # Digits pixels are 0..16, not 0..255.
    full = ImageSet(torch.from_numpy(images / 16.0).unsqueeze(1), torch.from_numpy(labels))
    tr, te = _stratified_split(labels, 0.2, seed=0)
    classes = [str(c) for c in range(10)]
    return DatasetBundle("digits", full.subset(tr), full.subset(te), 10, 1, (8, 8), classes)


# ---------------------------------------------------------------- PIL helpers
def _pil_to_array(image, mode: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    image = image.convert(mode)
    if image.size != (size[1], size[0]):  # PIL sizes are (W, H)
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _stack(arrays: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int]) -> ImageSet:
    x = torch.from_numpy(np.stack(arrays)).float().div_(255)
    return ImageSet(x, torch.tensor(labels, dtype=torch.long))


def _square(image_size: int | tuple[int, int] | None, default: int) -> tuple[int, int]:
    size = default if image_size is None else image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ConfigError(f"image_size must be positive; got {image_size!r}")
    return int(h), int(w)


def _resize(data: ImageSet, size: tuple[int, int]) -> ImageSet:
    if tuple(data.x.shape[-2:]) == size:
        return data
    x = F.interpolate(data.x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return ImageSet(x.clamp_(0.0, 1.0), data.y)


# ---------------------------------------------------------------- torchvision sets
def _pil_set(dataset, indices, size: tuple[int, int]) -> ImageSet:
    # One decoded image at a time: holding every full-size PIL image (Caltech) would need GBs.
    arrays, labels = [], []
    for i in indices:
        image, label = dataset[i]  # Caltech mixes gray and RGB: convert all to RGB
        arrays.append(_pil_to_array(image, "RGB", size))
        labels.append(int(label))
    return _stack(arrays, labels)


def _load_torchvision(name: str, root: Path, download: bool, size: tuple[int, int]):
    from torchvision import datasets

    folder = root / name
    try:
        if name == "cifar100":
            parts = [datasets.CIFAR100(folder, train=t, download=download) for t in (True, False)]
            classes = list(parts[0].classes)
            train, test = (
                _resize(_stack(p.data.transpose(0, 3, 1, 2), p.targets), size) for p in parts
            )
        elif name == "flowers102":
            tr, va, te = (
                datasets.Flowers102(folder, split=s, download=download)
                for s in ("train", "val", "test")
            )
            classes = list(datasets.Flowers102.classes)
            # The official train and val splits hold 10 images per class each: train on both.
            train = _pil_set(
                torch.utils.data.ConcatDataset([tr, va]), range(len(tr) + len(va)), size
            )
            test = _pil_set(te, range(len(te)), size)
        else:
            full = datasets.Caltech256(folder, download=download)
            classes = [c.split(".", 1)[-1] for c in full.categories]
            # Caltech-256 ships no split: use a fixed, stratified 80/20 one.
            tr, te = _stratified_split(full.y, 0.2, seed=0)
            train, test = _pil_set(full, tr, size), _pil_set(full, te, size)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        how = "the download failed" if download else "pass download=True (needs internet)"
        raise DatasetError(
            f"{name} not found or corrupted under {folder} ({err}); {how}, "
            f"or unpack the files as {folder}/{TORCHVISION_LAYOUT[name]}"
        ) from err
    except OSError as err:  # offline download, unreadable image
        raise DatasetError(f"{name} under {folder} could not be read or downloaded: {err}") from err
    return DatasetBundle(name, train, test, len(classes), 3, size, classes)


# ---------------------------------------------------------------- imagefolder:PATH
def _class_images(split_dir: Path) -> dict[str, list[Path]]:
    if not split_dir.is_dir():
        raise DatasetError(
            f"image folder needs {split_dir}/ with one subfolder per class; it is missing"
        )
    classes = sorted(
        d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not classes:
        raise DatasetError(
            f"{split_dir} has no class subfolders; expected {split_dir}/<class>/*.png|jpg"
        )
    files = {}
    for c in classes:
        files[c] = sorted(
            p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files[c]:
            raise DatasetError(
                f"class folder {split_dir / c} has no images ({'|'.join(IMAGE_SUFFIXES)})"
            )
    return files


def _load_imagefolder(path: Path, image_size: int | tuple[int, int] | None) -> DatasetBundle:
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise DatasetError(
            f"imagefolder path {str(path)!r} is not a directory; expected PATH/train/<class>/"
        )
    train_files, test_files = _class_images(path / "train"), _class_images(path / "test")
    if set(train_files) != set(test_files):
        only_train = sorted(set(train_files) - set(test_files))
        only_test = sorted(set(test_files) - set(train_files))
        raise DatasetError(
            f"{path}: train/ and test/ class folders differ; only in train: {only_train}, "
            f"only in test: {only_test}"
        )
    classes = sorted(train_files)
    all_files = [p for files in (train_files, test_files) for c in classes for p in files[c]]
    # First pass reads headers only, to pick channels and the common size before decoding.
    modes, sizes = [], Counter()
    for p in all_files:
        try:
            with Image.open(p) as img:
                modes.append(img.mode)
                sizes[(img.height, img.width)] += 1
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"cannot read image {p}: {err}") from err
    gray = all(m in ("1", "L", "LA", "I", "I;16", "F") for m in modes)
    mode = "L" if gray else "RGB"
    size = _square(image_size, 0) if image_size is not None else sizes.most_common(1)[0][0]

    def load(files: dict[str, list[Path]]) -> ImageSet:
        arrays, labels = [], []
        for label, c in enumerate(classes):
            for p in files[c]:
                try:
                    with Image.open(p) as img:
                        arrays.append(_pil_to_array(img, mode, size))
                except (OSError, ValueError) as err:  # truncated data surfaces only on decode
                    raise DatasetError(f"cannot decode image {p}: {err}") from err
                labels.append(label)
        return _stack(arrays, labels)

    name = f"imagefolder:{path}"
    return DatasetBundle(
        name, load(train_files), load(test_files), len(classes), 1 if gray else 3, size, classes
    )


def load_dataset(
    name: str = "fashion-mnist",
    root: str | Path = "data",
    *,
    download: bool = False,
    image_size: int | tuple[int, int] | None = None,
) -> DatasetBundle:
    """Load dataset `name` (see DATASET_NAMES) fully into memory as a DatasetBundle.

    `image_size` resizes every image (int or (H, W)); by default each set keeps its native size
    (torchvision sets: 32 for CIFAR-100, 64 otherwise; imagefolder: the most common size).
    """
    root = Path(root)
    if name.startswith("imagefolder:"):
        folder = name.removeprefix("imagefolder:")
        if not folder:
            raise DatasetError(
                "dataset 'imagefolder:' needs a path, e.g. imagefolder:data/my-images"
            )
        return _load_imagefolder(Path(folder), image_size)
    if name in TORCHVISION_SIZES:
        return _load_torchvision(name, root, download, _square(image_size, TORCHVISION_SIZES[name]))
    if name == "fashion-mnist":
        bundle = _load_fashion_mnist(root)
    elif name == "digits":
        bundle = _load_digits()
    else:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if image_size is not None:
        size = _square(image_size, 0)
        bundle.train, bundle.test = _resize(bundle.train, size), _resize(bundle.test, size)
        bundle.image_size = size
    return bundle


# ---------------------------------------------------------------- lifecycle stages
def _split_val(data: ImageSet, val_fraction: float) -> tuple[ImageSet, ImageSet]:
    n_val = int(round(len(data) * val_fraction))
    n_val = min(n_val, len(data) - 1)  # always leave something to train on
    idx = torch.arange(len(data))
    return data.subset(idx[n_val:]), data.subset(idx[:n_val])


def make_stages(
    bundle: DatasetBundle,
    *,
    updates: int,
    seed: int = 0,
    shifts: Sequence[str] = ("invert", "rotate", "contrast"),
    base_fraction: float = 0.5,
    val_fraction: float = 0.1,
    update_size: int | None = None,
    update_fraction: float = 1.0,
) -> list[Stage]:
    """Cut `bundle` into a base stage and `updates` update stages on disjoint train slices.

    Update 1 is in-distribution; updates 2.. cycle through `shifts`, applied to that stage's
    train, val and test (the full test set). `update_fraction` keeps only that share of each
    update stage's *training* images (at least 2; its val split is cut first and kept whole),
    the small-data case of a site with a few labelled images. Deterministic for a given `seed`.
    """
    if not isinstance(updates, int) or updates < 0:
        raise ConfigError(f"updates must be an int >= 0; got {updates!r}")
    if not 0.0 < base_fraction < 1.0:
        raise ConfigError(f"base_fraction must be in (0, 1); got {base_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1); got {val_fraction!r}")
    if not isinstance(update_fraction, (int, float)) or not 0.0 < update_fraction <= 1.0:
        raise ConfigError(f"update_fraction must be in (0, 1]; got {update_fraction!r}")
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shift(s) {unknown}; expected names from {', '.join(SHIFTS)}")
    n = len(bundle.train)
    n_base = int(n * base_fraction)
    rest = n - n_base
    size = update_size if update_size is not None else (rest // updates if updates else 0)
    if updates and (size < 2 or size * updates > rest):
        raise ConfigError(
            f"cannot cut {updates} update slices of {size} images from the {rest} train "
            f"images left after the base ({n} x base_fraction {base_fraction})"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    stages = []
    for k in range(updates + 1):
        idx = order[:n_base] if k == 0 else order[n_base + (k - 1) * size : n_base + k * size]
        train, val = _split_val(bundle.train.subset(idx), val_fraction)
        if k > 0 and update_fraction < 1.0:
            keep = max(2, int(round(len(train) * update_fraction)))
            train = train.subset(torch.arange(min(keep, len(train))))
        test = bundle.test
        shift = shifts[(k - 2) % len(shifts)] if k >= 2 and shifts else None
        if shift is not None:
            # Distinct seeds per part so seeded shifts (noise) never repeat a pattern across parts.
            part_seed = seed * 1000 + k * 10
            train = ImageSet(apply_shift(train.x, shift, seed=part_seed), train.y)
            val = ImageSet(apply_shift(val.x, shift, seed=part_seed + 1), val.y)
            test = ImageSet(apply_shift(test.x, shift, seed=part_seed + 2), test.y)
        name = "base" if k == 0 else f"update{k}" + (f"-{shift}" if shift else "")
        stages.append(Stage(name, k, train, val, test, shift is not None, shift))
    return stages


def batches(
    data: ImageSet, batch_size: int, *, shuffle: bool, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) minibatches of `data`; with `shuffle`, in a seeded random order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size!r}")
    n = len(data)
    if not shuffle:
        for start in range(0, n, batch_size):
            yield data.x[start : start + batch_size], data.y[start : start + batch_size]
        return
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield data.x[idx], data.y[idx]
