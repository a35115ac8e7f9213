"""Data layer: IDX parsing, dataset loaders, image folders, lifecycle stages, shifts, batches."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaloc.data import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_FILES,
    DatasetBundle,
    ImageSet,
    batches,
    load_dataset,
    make_stages,
    read_idx,
)
from adaloc.errors import ConfigError, DatasetError
from adaloc.shifts import SHIFTS, apply_shift


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format (gzipped when the name ends in .gz)."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def tiny_bundle(n_train: int = 200, n_test: int = 40) -> DatasetBundle:
    gen = torch.Generator().manual_seed(0)
    train = ImageSet(torch.rand(n_train, 1, 8, 8, generator=gen), torch.arange(n_train) % 4)
    test = ImageSet(torch.rand(n_test, 1, 8, 8, generator=gen), torch.arange(n_test) % 4)
    return DatasetBundle("tiny", train, test, 4, 1, (8, 8), ["a", "b", "c", "d"])


# ---------------------------------------------------------------- IDX and built-in datasets
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    array = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / f"images{suffix}", array)
    np.testing.assert_array_equal(read_idx(tmp_path / f"images{suffix}"), array)


def test_truncated_and_bad_magic_idx_raise(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.arange(10, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DatasetError, match="labels.*truncated"):
        read_idx(path)
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(8))
    with pytest.raises(DatasetError, match="magic"):
        read_idx(path)
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="broken.gz"):
        read_idx(tmp_path / "broken.gz")


def test_fashion_mnist_from_idx_files_in_root(tmp_path: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    images, labels = np.full((6, 28, 28), 255, np.uint8), np.arange(6, dtype=np.uint8)
    for stem, array in zip(
        FASHION_MNIST_FILES, (images, labels, images[:2], labels[:2]), strict=True
    ):
        write_idx(folder / stem, array)
    bundle = load_dataset("fashion-mnist", tmp_path)
    assert bundle.train.x.shape == (6, 1, 28, 28) and len(bundle.test) == 2
    assert bundle.train.x.max() == 1.0 and bundle.train.y.tolist() == list(range(6))


def test_fashion_mnist_partial_root_names_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    write_idx(folder / FASHION_MNIST_FILES[0], np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_missing_everywhere(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("adaloc.data.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    expected = f"apt-get install dataset-fashion-mnist` or put the four IDX files in {tmp_path}"
    with pytest.raises(DatasetError, match=expected.replace("`", ".")):
        load_dataset("fashion-mnist", tmp_path)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_fills_empty_root_from_debian(tmp_path: Path) -> None:
    bundle = load_dataset("fashion-mnist", tmp_path)
    assert bundle.train.x.shape == (60000, 1, 28, 28) and bundle.train.x.dtype == torch.float32
    assert len(bundle.test) == 10000 and bundle.num_classes == 10 and bundle.in_channels == 1
    assert bundle.train.y.unique().tolist() == list(range(10))
    assert bundle.train.x.min() >= 0.0 and bundle.train.x.max() <= 1.0
    assert len(list((tmp_path / "fashion-mnist").iterdir())) == 4


def test_digits_and_resize() -> None:
    bundle = load_dataset("digits")
    assert bundle.train.x.shape[1:] == (1, 8, 8) and len(bundle.train) + len(bundle.test) == 1797
    assert bundle.train.x.max() == 1.0 and bundle.test.y.unique().tolist() == list(range(10))
    assert torch.equal(load_dataset("digits").test.y, bundle.test.y)  # fixed split
    assert load_dataset("digits", image_size=16).train.x.shape[-2:] == (16, 16)


def test_unknown_and_offline_torchvision_datasets(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*fashion-mnist.*imagefolder"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetError, match="download=True"):
        load_dataset("cifar100", tmp_path)


# ---------------------------------------------------------------- imagefolder:PATH
def make_folder(
    root: Path, layout: dict[str, dict[str, list[tuple[str, tuple[int, int]]]]]
) -> Path:
    """Write PNGs: layout[split][class] = [(PIL mode, (W, H)), ...]."""
    for split, classes in layout.items():
        (root / split).mkdir(parents=True)
        for cls, images in classes.items():
            (root / split / cls).mkdir()
            for i, (mode, size) in enumerate(images):
                Image.new(mode, size, color=40 * i + 10).save(root / split / cls / f"{i}.png")
    return root


def test_imagefolder_grayscale_most_common_size(tmp_path: Path) -> None:
    g = ("L", (12, 10))
    make_folder(
        tmp_path, {"train": {"b": [g, g], "a": [g, ("L", (20, 20))]}, "test": {"a": [g], "b": [g]}}
    )
    bundle = load_dataset(f"imagefolder:{tmp_path}")
    assert (
        bundle.classes == ["a", "b"] and bundle.in_channels == 1 and bundle.image_size == (10, 12)
    )
    assert bundle.train.x.shape == (4, 1, 10, 12) and bundle.train.y.tolist() == [0, 0, 1, 1]
    assert len(bundle.test) == 2 and bundle.num_classes == 2


def test_imagefolder_mixed_modes_become_rgb_and_resize(tmp_path: Path) -> None:
    layout = {"train": {"x": [("L", (9, 9)), ("RGB", (16, 8))]}, "test": {"x": [("RGBA", (5, 7))]}}
    make_folder(tmp_path, layout)
    bundle = load_dataset(f"imagefolder:{tmp_path}", image_size=(6, 10))
    assert bundle.in_channels == 3 and bundle.train.x.shape == (2, 3, 6, 10)
    assert bundle.test.x.shape == (1, 3, 6, 10)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ({"train": {"a": [("L", (4, 4))]}}, "test"),
        ({"train": {}, "test": {}}, "no class subfolders"),
        ({"train": {"a": []}, "test": {"a": [("L", (4, 4))]}}, "no images"),
        (
            {"train": {"a": [("L", (4, 4))]}, "test": {"b": [("L", (4, 4))]}},
            r"only in train: \['a'\]",
        ),
    ],
)
def test_imagefolder_malformed(tmp_path: Path, layout: dict, match: str) -> None:
    make_folder(tmp_path, layout)
    with pytest.raises(DatasetError, match=match):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_missing_path_and_unreadable_image(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("imagefolder:")
    make_folder(tmp_path, {"train": {"a": [("L", (4, 4))]}, "test": {"a": [("L", (4, 4))]}})
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="bad.png"):
        load_dataset(f"imagefolder:{tmp_path}")


# ---------------------------------------------------------------- stages, shifts, batches
def test_make_stages_disjoint_deterministic_and_shifted() -> None:
    bundle = tiny_bundle()
    stages = make_stages(bundle, updates=3, seed=1)
    assert [s.name for s in stages] == ["base", "update1", "update2-invert", "update3-rotate"]
    assert [s.shifted for s in stages] == [False, False, True, True]
    assert [s.shift for s in stages] == [None, None, "invert", "rotate"]
    # Rows of tiny_bundle are unique random vectors: compare them to prove disjointness.
    unshifted = [torch.cat([s.train.x, s.val.x]) for s in stages[:2]]
    unshifted += [1.0 - torch.cat([stages[2].train.x, stages[2].val.x])]
    rows = torch.cat(unshifted).flatten(1)
    assert len(rows) == 100 + 33 + 33 and torch.unique(rows, dim=0).shape[0] == len(rows)
    assert len(stages[0].train) + len(stages[0].val) == 100 and len(stages[0].val) == 10
    assert torch.equal(stages[1].test.x, bundle.test.x)
    assert torch.allclose(stages[2].test.x, 1.0 - bundle.test.x)
    again = make_stages(bundle, updates=3, seed=1)
    for a, b in zip(stages, again, strict=True):
        assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    other = make_stages(bundle, updates=3, seed=2)
    assert not torch.equal(other[1].train.x, stages[1].train.x)


def test_make_stages_sizes_and_errors() -> None:
    bundle = tiny_bundle()
    stages = make_stages(bundle, updates=2, update_size=20, shifts=(), val_fraction=0.0)
    assert [len(s.train) for s in stages] == [100, 20, 20] and not any(s.shifted for s in stages)
    with pytest.raises(ConfigError, match="update slices"):
        make_stages(bundle, updates=2, update_size=80)
    with pytest.raises(ConfigError, match="'warp'"):
        make_stages(bundle, updates=2, shifts=("warp",))
    with pytest.raises(ConfigError, match="base_fraction"):
        make_stages(bundle, updates=1, base_fraction=1.0)


def test_update_fraction_shrinks_update_training_sets_only() -> None:
    bundle = tiny_bundle()
    full = make_stages(bundle, updates=2, seed=3)
    small = make_stages(bundle, updates=2, seed=3, update_fraction=0.1)
    assert torch.equal(small[0].train.x, full[0].train.x)  # the base keeps all its data
    for a, b in zip(full[1:], small[1:], strict=True):
        assert len(b.train) == round(0.1 * len(a.train))
        assert torch.equal(b.train.x, a.train.x[: len(b.train)])  # a prefix of the same slice
        assert torch.equal(b.val.x, a.val.x)  # the val split is cut first and kept whole
    with pytest.raises(ConfigError, match="update_fraction"):
        make_stages(bundle, updates=2, update_fraction=0.0)


@pytest.mark.parametrize("name", SHIFTS)
def test_each_shift_changes_images_deterministically(name: str) -> None:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    shifted = apply_shift(x, name, seed=3)
    assert shifted.shape == x.shape and torch.equal(x, before)  # input untouched
    assert not torch.allclose(shifted, x) and shifted.min() >= 0.0 and shifted.max() <= 1.0
    assert torch.equal(shifted, apply_shift(x, name, seed=3))
    assert apply_shift(torch.rand(2, 1, 8, 8), name).shape == (2, 1, 8, 8)  # digits-sized


def test_unknown_shift_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="'warp'.*invert.*noise"):
        apply_shift(torch.rand(1, 1, 8, 8), "warp")


def test_batches_cover_data_and_shuffle_is_seeded() -> None:
    data = tiny_bundle(n_train=10).train
    plain = list(batches(data, 4, shuffle=False))
    assert [len(y) for _, y in plain] == [4, 4, 2] and torch.equal(plain[0][0], data.x[:4])
    order = torch.cat([y for _, y in batches(data, 3, shuffle=True, seed=5)])
    again = torch.cat([y for _, y in batches(data, 3, shuffle=True, seed=5)])
    assert torch.equal(order, again) and sorted(order.tolist()) == sorted(data.y.tolist())
    with pytest.raises(ConfigError):
        next(batches(data, 0, shuffle=False))


def test_imageset_validates_and_subsets() -> None:
    with pytest.raises(DatasetError, match="3 images but 2 labels"):
        ImageSet(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DatasetError, match="int64"):
        ImageSet(torch.zeros(3, 1, 2, 2), torch.zeros(3))
    data = tiny_bundle(n_train=10).train
    assert data.subset([1, 3]).y.tolist() == [1, 3] and len(data.subset(torch.arange(5))) == 5
