"""The streaming path: an image folder or its uint8 shards, read lazily through DataLoader
workers, trains (full and key-only), feeds saliency key selection and evaluates like the
in-memory path; the shards hold the same samples, each once per epoch, in a seeded order,
split disjointly over ranks, and a damaged shard is a one-line DatasetError."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from torch.utils.data.distributed import DistributedSampler

from adaloc.data import load_dataset
from adaloc.errors import DatasetError
from adaloc.evaluate import accuracy, evaluate_lock
from adaloc.keys import KeySpec, select_key
from adaloc.lock import lock, outside_key_sha256
from adaloc.models import build_model
from adaloc.shards import MANIFEST, ShardSet, main, write_shards
from adaloc.streaming import (
    IMAGE_FOLDER_WORKERS,
    fit_stream,
    image_folder,
    key_sample,
    make_loader,
    stream_dataset,
    write_image_folder,
)
from adaloc.training import TrainConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The digits set written as PNGs: root/train/<class>/*.png, root/test/<class>/*.png."""
    root = tmp_path_factory.mktemp("digits-png")
    bundle = load_dataset("digits")
    write_image_folder(bundle.train.subset(torch.arange(600)), root / "train")
    write_image_folder(bundle.test, root / "test")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """The same folder as shards of 100 samples (train: 6 shards), made by the CLI."""
    out = tmp_path_factory.mktemp("digits-shards") / "shards"
    cmd = [sys.executable, "-m", "adaloc.shards", str(folder), str(out), "--shard-size", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {"train": 600, "test": len(load_dataset("digits").test)}
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"out": str(out), **counts}
    assert len(json.loads((out / "train" / MANIFEST).read_text())["shards"]) == 6
    return out


def _numbered(tmp_path, n: int, *, shard_size: int = 16):
    """Shards of n samples whose pixels spell their own index (identity survives shuffling)."""
    idx = torch.arange(n)
    x = torch.stack([idx // 256, idx % 256], dim=1).view(n, 1, 1, 2).float() / 255
    write_shards(TensorDataset(x, idx % 3), tmp_path / "num", classes=["a", "b", "c"],
                 shard_size=shard_size, num_workers=0, progress=False)  # fmt: skip
    return ShardSet(tmp_path / "num")


def _ids(batches) -> list[int]:
    out = []
    for x, _ in batches:
        px = (x * 255).round().long().view(len(x), 2)
        out += (px[:, 0] * 256 + px[:, 1]).tolist()
    return out


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_stream_reads_the_same_samples_as_the_in_memory_loader(source, request):
    streamed = stream_dataset(request.getfixturevalue(source))
    in_memory = load_dataset(f"imagefolder:{request.getfixturevalue('folder')}")
    assert (streamed.in_channels, streamed.image_size) == (1, (8, 8))
    assert streamed.classes == in_memory.classes and len(streamed.train) == 600
    loader = make_loader(streamed.train, batch_size=64, shuffle=True, num_workers=2)
    x, y = map(torch.cat, zip(*loader, strict=True))
    assert x.dtype == torch.float32 and x.shape == (600, 1, 8, 8) and y.dtype == torch.int64

    def samples(xs, ys):  # the multiset of (pixels, label): each source sample exactly once
        return sorted((bytes(a.numpy().tobytes()), int(b)) for a, b in zip(xs, ys, strict=True))

    assert samples(x, y) == samples(in_memory.train.x, in_memory.train.y)


def test_shard_epochs_are_seeded_and_independent_of_the_worker_count(tmp_path):
    ds = _numbered(tmp_path, 203)
    runs = {}
    for workers in (0, 2):
        loader = make_loader(ds, batch_size=10, shuffle=True, seed=7, num_workers=workers)
        runs[workers] = [_ids(loader), _ids(loader)]  # two epochs
    assert runs[0] == runs[2]
    first, second = runs[0]
    assert sorted(first) == sorted(second) == list(range(203))  # every sample once per epoch
    assert first != second and first != sorted(first)  # reshuffled each epoch
    other = make_loader(ds, batch_size=10, shuffle=True, seed=8, num_workers=0)
    assert _ids(other) != first
    plain = make_loader(ds, batch_size=10, num_workers=0)
    assert len(plain) == 21 and sorted(_ids(plain)) == list(range(203))


def test_default_workers_read_shards_in_process_and_decode_folders_in_two(tmp_path, folder):
    shards = make_loader(_numbered(tmp_path, 40), batch_size=10, shuffle=True)
    assert shards.loader.num_workers == 0
    assert sorted(_ids(shards)) == list(range(40))
    pngs = make_loader(image_folder(folder / "train"), batch_size=64)
    assert pngs.num_workers == IMAGE_FOLDER_WORKERS == 2


@pytest.mark.parametrize("world", [2, 3])
def test_shard_rank_splits_are_equal_disjoint_and_cover_the_set(tmp_path, world):
    ds = _numbered(tmp_path, 203)
    parts = []
    for rank in range(world):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, seed=3, drop_last=True)
        loader = make_loader(ds, batch_size=8, sampler=sampler, num_workers=1)
        sampler.set_epoch(1)
        parts.append(_ids(loader))
        assert len(loader) == len(list(loader))
    assert all(len(p) == 203 // world for p in parts)
    seen = [i for p in parts for i in p]
    assert len(set(seen)) == len(seen) == world * (203 // world)  # disjoint, N - N % world


def test_damaged_shards_are_one_line_dataset_errors(shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards / "train", bad)
    meta = json.loads((bad / MANIFEST).read_text())
    x_file = bad / meta["shards"][2]["x"]
    data = bytearray(x_file.read_bytes())
    data[-5] ^= 0xFF  # same size, one pixel flipped: only the sha256 sees it
    x_file.write_bytes(bytes(data))
    loader = make_loader(ShardSet(bad), batch_size=50, shuffle=True, num_workers=1)
    with pytest.raises(DatasetError, match=r"sha256") as err:
        list(loader)
    assert "\n" not in str(err.value) and x_file.name in str(err.value)

    x_file.write_bytes(bytes(data[:-100]))  # truncated: caught when the set is opened
    with pytest.raises(DatasetError, match="truncated") as err:
        ShardSet(bad)
    assert "\n" not in str(err.value)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(DatasetError, match="not a shard manifest"):
        ShardSet(bad)


def test_converter_refuses_a_broken_image_and_writes_nothing(folder, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    victim = sorted((src / "train" / "03").iterdir())[4]
    victim.write_bytes(victim.read_bytes()[:20])  # truncated PNG
    assert main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: cannot decode image") and victim.name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial


def test_stream_reads_the_same_images_as_the_in_memory_loader(folder):
    streamed = stream_dataset(folder)
    in_memory = load_dataset(f"imagefolder:{folder}")
    assert (streamed.in_channels, streamed.image_size) == (1, (8, 8))
    assert streamed.classes == in_memory.classes and len(streamed.train) == 600
    x, y = streamed.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    torch.testing.assert_close(x, in_memory.train.x[0])
    assert y == int(in_memory.train.y[0])


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_full_then_key_only_training_and_evaluation_on_a_loader(source, request):
    folder = request.getfixturevalue("folder")
    bundle = stream_dataset(request.getfixturevalue(source))
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=(8, 8))
    cfg = TrainConfig(epochs=2, lr=0.1, device="cpu")
    train = make_loader(bundle.train, batch_size=32, shuffle=True, num_workers=2)
    test = make_loader(bundle.test, batch_size=128, num_workers=1)
    report = fit_stream(model, train, cfg, progress=False)
    assert report.steps == 2 * len(train)
    in_memory = load_dataset(f"imagefolder:{folder}").test
    assert accuracy(model, test) == accuracy(model, in_memory) > 0.5

    mask = select_key(
        model, KeySpec(budget=0.1, selection="saliency"), data=key_sample(bundle.train, n=256)
    )
    base, key = lock(model, mask)
    metrics = evaluate_lock(base, key, test)
    assert metrics["authorized_acc"] > 0.5 and metrics["chance"] == 0.1

    before = outside_key_sha256(model, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fit_stream(model, train, TrainConfig(epochs=1, optimizer="adamw", device="cpu"), mask=mask,
               progress=False)  # fmt: skip
    assert outside_key_sha256(model, mask) == before
    changed = [n for n, v in model.state_dict().items() if not torch.equal(v, state[n])]
    assert changed and set(changed) <= set(mask.names)


def test_missing_or_empty_folder_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="train"):
        stream_dataset(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError):
        stream_dataset(tmp_path)


def test_png_decoding_matches_pil_also_when_it_falls_back(tmp_path):
    """8-bit PNGs of the wanted channels and size go through libpng; others (RGB read as
    grayscale, another size, 16-bit) through PIL: the pixels are PIL's in every case."""
    from PIL import Image

    from adaloc.streaming import image_folder

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a" / "0.png")
    wide = rng.integers(0, 65536, (6, 5), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "a" / "1.png")
    for mode, size in (("RGB", (6, 5)), ("L", (6, 5)), ("L", (4, 4))):
        ds = image_folder(tmp_path, mode=mode, image_size=size)
        for k, (x, _) in enumerate(ds):
            with Image.open(tmp_path / "a" / f"{k}.png") as img:
                img = img.convert(mode)
                if img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                want = np.asarray(img, dtype=np.uint8)
            want = want[None] if want.ndim == 2 else want.transpose(2, 0, 1)
            assert torch.equal(x, torch.from_numpy(want.copy()).float().div_(255)), (mode, k)
