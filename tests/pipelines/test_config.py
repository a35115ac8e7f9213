"""The pipeline config: file formats, overrides, validation, round trip."""

from __future__ import annotations

import json

import pytest

from adaloc.errors import ConfigError
from pipelines.config import PipelineConfig, from_dict, load_config, parse_overrides
from tests.pipelines.conftest import REPO


def test_default_toml_loads_and_round_trips():
    cfg = load_config(REPO / "pipelines" / "configs" / "fashion-mnist.toml")
    assert cfg.dataset == "fashion-mnist" and cfg.key_spec().budget == 0.05
    assert from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_files_and_overrides(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"epochs": 3, "key": {"budget": 0.02}}))
    elif suffix == ".yaml":
        path.write_text("epochs: 3\nkey:\n  budget: 0.02\n")
    else:
        path.write_text("epochs = 3\n[key]\nbudget = 0.02\n")
    cfg = load_config(path, ["key.selection=random", "device=cpu", "updates=4"])
    assert (cfg.epochs, cfg.device, cfg.updates) == (3, "cpu", 4)
    assert cfg.key == {"budget": 0.02, "selection": "random"}


def test_overrides_parse_json_values():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=text", "key.seed=3"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "text",
        "key": {"seed": 3},
    }
    with pytest.raises(ConfigError, match="field=value"):
        parse_overrides(["epochs"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "epochs"),
        ({"authorized_threshold": 1.5}, "authorized_threshold"),
        ({"optimizer": "lion"}, "lion"),
        ({"device": "tpu"}, "tpu"),
        ({"key": {"budget": 2.0}}, "budget"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_values_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig(**change)


def test_unknown_fields_warn_and_missing_file_fails(tmp_path):
    with pytest.warns(UserWarning, match="colour"):
        from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_embedded_default_only_without_a_tracking_server(tmp_path):
    cfg = PipelineConfig().resolved(tmp_path)
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.artifact_location.startswith("file:")
    served = PipelineConfig(tracking_uri="http://127.0.0.1:5000").resolved(tmp_path)
    assert served.artifact_location == ""
