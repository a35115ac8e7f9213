"""The lifecycle recipe runs unchanged on other datasets and keeps its promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _recipe():
    spec = importlib.util.spec_from_file_location("lifecycle", ROOT / "bench" / "lifecycle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, dataset, *extra, epochs=1):
    recipe = _recipe()
    args = recipe.get_args_parser().parse_args(
        [
            "--dataset",
            dataset,
            "--updates",
            "2",
            "--epochs",
            str(epochs),
            "--key-budget",
            "0.1",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            *extra,
        ]
    )
    recipe.main(args)
    return json.loads((tmp_path / "out" / "lifecycle.json").read_text())


def _check(result):
    assert {"dataset", "model", "num_classes", "chance", "key", "base_sha256", "versions"} <= set(
        result
    )
    vs = result["versions"]
    assert [v["version"] for v in vs] == [1, 2, 3]
    assert len({v["outside_key_sha256"] for v in vs}) == 1, "an update moved the non-key network"
    assert result["key"]["params_in_key"] <= 0.1 * result["key"]["params_total"]
    for v in vs:
        assert v["key_bytes"] < v["base_bytes"]
        assert 0.0 <= v["unauthorized_acc"] <= 1.0
    assert vs[2]["shifted"] and not vs[1]["shifted"]


@pytest.mark.slow
def test_recipe_on_digits(tmp_path):
    result = _run(tmp_path, "digits", "--rules", "magnitude", epochs=8)
    _check(result)
    assert result["num_classes"] == 10
    # the owner's model learned something; the locked base did not keep it
    assert result["versions"][0]["authorized_acc"] > 0.5
    assert result["versions"][0]["unauthorized_acc"] < result["versions"][0]["authorized_acc"]
    assert "magnitude" in result["rules"]
    assert (tmp_path / "out" / "lifecycle.png").stat().st_size > 0


@pytest.mark.slow
def test_recipe_on_imagefolder(tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 60), ("test", 12)):
        for c, name in enumerate(("dark", "light", "striped")):
            folder = tmp_path / "folder" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = torch.rand(3, 20, 20, generator=g) * 0.3 + 0.3 * c
                if name == "striped":
                    img[:, ::4] = 1.0
                arr = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(folder / f"{i}.png")
    result = _run(tmp_path, f"imagefolder:{tmp_path / 'folder'}")
    _check(result)
    assert result["num_classes"] == 3
