"""The streaming path: an image folder read lazily through DataLoader workers trains (full
and key-only), feeds saliency key selection and evaluates like the in-memory path."""

from __future__ import annotations

import pytest
import torch

from adaloc.data import load_dataset
from adaloc.errors import DatasetError
from adaloc.evaluate import accuracy, evaluate_lock
from adaloc.keys import KeySpec, select_key
from adaloc.lock import lock, outside_key_sha256
from adaloc.models import build_model
from adaloc.streaming import fit_stream, key_sample, make_loader, stream_dataset, write_image_folder
from adaloc.training import TrainConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The digits set written as PNGs: root/train/<class>/*.png, root/test/<class>/*.png."""
    root = tmp_path_factory.mktemp("digits-png")
    bundle = load_dataset("digits")
    write_image_folder(bundle.train.subset(torch.arange(600)), root / "train")
    write_image_folder(bundle.test, root / "test")
    return root


def test_stream_reads_the_same_images_as_the_in_memory_loader(folder):
    streamed = stream_dataset(folder)
    in_memory = load_dataset(f"imagefolder:{folder}")
    assert (streamed.in_channels, streamed.image_size) == (1, (8, 8))
    assert streamed.classes == in_memory.classes and len(streamed.train) == 600
    x, y = streamed.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    torch.testing.assert_close(x, in_memory.train.x[0])
    assert y == int(in_memory.train.y[0])


def test_full_then_key_only_training_and_evaluation_on_a_loader(folder):
    bundle = stream_dataset(folder)
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
