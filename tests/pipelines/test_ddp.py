"""The DDP path: 2 CPU processes (gloo) under torchrun, full and key-only training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def _torchrun(tmp_path, *args: str, dataset: str = "digits") -> dict:
    out = tmp_path / f"{args[args.index('--mode') + 1]}.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pipelines.train_ddp",
        "--dataset",
        dataset,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out",
        str(out),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / f"{out.name}.json").read_text()) | {"path": str(out)}


def test_ddp_two_gloo_processes_keep_key_only_guarantee(tmp_path):
    from safetensors.torch import load_file

    from adaloc.artifact import save_key
    from adaloc.data import load_dataset
    from adaloc.keys import KeySpec, select_key
    from adaloc.lock import lock, outside_key_sha256
    from adaloc.models import build_model

    full = _torchrun(tmp_path, "--mode", "full")
    assert full["world_size"] == 2 and full["backend"] == "gloo" and full["ranks_agree"]

    bundle = load_dataset("digits")
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=bundle.image_size)
    model.load_state_dict(load_file(full["path"]))
    mask = select_key(model, KeySpec(budget=0.05))
    _, key = lock(model, mask)
    save_key(key, tmp_path / "key.safetensors")
    before = load_file(full["path"])

    keyed = _torchrun(
        tmp_path,
        "--mode",
        "key",
        "--init",
        full["path"],
        "--key",
        str(tmp_path / "key.safetensors"),
        "--optimizer",
        "adamw",
    )
    assert keyed["ranks_agree"], "the two ranks ended with different weights"
    assert keyed["outside_key_sha256_after"] == keyed["outside_key_sha256_before"]
    after = load_file(keyed["path"])
    model.load_state_dict(after)
    assert outside_key_sha256(model, mask) == keyed["outside_key_sha256_before"]
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    assert changed and set(changed) <= set(mask.names), f"moved outside the key: {changed}"


@pytest.mark.parametrize("source", ["imagefolder", "shards"])
def test_ddp_key_only_update_on_the_streaming_path(tmp_path, source):
    """2 gloo ranks, each reading its DistributedSampler part of a PNG folder (or of the same
    images as uint8 shards) through DataLoader workers: only key positions move, every other
    value stays bit-identical."""
    from safetensors.torch import load_file, save_file

    from adaloc.artifact import save_key
    from adaloc.data import load_dataset
    from adaloc.keys import KeySpec, select_key
    from adaloc.lock import lock, outside_key_sha256
    from adaloc.models import build_model
    from adaloc.streaming import write_image_folder

    bundle = load_dataset("digits")
    n = write_image_folder(bundle.train, tmp_path / "png" / "train")
    write_image_folder(bundle.test, tmp_path / "png" / "test")
    if source == "shards":  # 300 samples a shard: several shards per rank and window
        # With the CLI, as users make shards: its DataLoader workers are forked from a fresh
        # process, not from this long-lived, many-threaded test process.
        cmd = [sys.executable, "-m", "adaloc.shards", str(tmp_path / "png"),
               str(tmp_path / "shards"), "--shard-size", "300"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=bundle.image_size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "init.st")
    mask = select_key(model, KeySpec(budget=0.05))
    save_key(lock(model, mask)[1], tmp_path / "key.safetensors")
    before = load_file(tmp_path / "init.st")

    keyed = _torchrun(
        tmp_path,
        "--mode", "key", "--stream", "--num-workers", "2" if source == "shards" else "1",
        "--init", str(tmp_path / "init.st"), "--key", str(tmp_path / "key.safetensors"),
        "--optimizer", "adamw",
        dataset=f"{source}:{tmp_path / ('png' if source == 'imagefolder' else 'shards')}",
    )  # fmt: skip
    assert keyed["stream"] and keyed["ranks_agree"], "the two ranks ended with different weights"
    assert keyed["steps"] == -(-(n // 2) // 32), "each rank should walk half of the folder"
    assert keyed["outside_key_sha256_after"] == keyed["outside_key_sha256_before"]
    after = load_file(keyed["path"])
    model.load_state_dict(after)
    assert outside_key_sha256(model, mask) == keyed["outside_key_sha256_before"]
    for name in after:
        if name not in mask.names:
            assert torch.equal(after[name], before[name]), f"{name} moved outside the key"
    changed = [name for name in after if not torch.equal(after[name], before[name])]
    assert changed and set(changed) <= set(mask.names)


def test_lock_flow_trains_the_base_with_torchrun(tmp_path, prefect_api):
    from pipelines.flows.lock import lock_flow
    from tests.pipelines.conftest import make_owner_and_site, tiny_overrides

    ov = tiny_overrides(tmp_path, name="ddp", train_limit=8000)
    make_owner_and_site(tmp_path, ov)
    result = lock_flow(overrides=ov, nproc=2, progress=False)
    assert result["version"] == 1 and result["base"]["mlflow_version"] == 1
    m = result["metrics"]
    assert m["unauthorized_acc"] <= m["chance"] + ov["unauthorized_margin"]
    assert m["authorized_acc"] > m["chance"] + 0.2
