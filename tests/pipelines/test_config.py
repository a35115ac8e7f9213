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
        ({"token": "binry"}, "token"),
        ({"token_strategy": "single-target"}, "token_strategy"),
        ({"key": {"budget": -0.1}}, "budget"),
        ({"lr": -1}, "lr"),
        ({"dataset": "mnist"}, "dataset"),
        ({"model": "vgg"}, "model"),
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


def test_embedded_default_only_without_a_tracking_server(tmp_path, monkeypatch):
    from pipelines.settings import load_settings

    monkeypatch.setenv("ADALOC_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = PipelineConfig().resolved(load_settings())
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert cfg.artifact_location == (tmp_path.resolve() / "artifacts").as_uri()
    assert cfg.owner_dir == str(tmp_path.resolve() / "owner")
    served = PipelineConfig(tracking_uri="http://127.0.0.1:5000").resolved(load_settings())
    assert served.artifact_location == ""


def test_environment_overrides_the_shared_defaults(tmp_path, monkeypatch):
    from pipelines.settings import DEFAULTS, load_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("ADALOC_OWNER_DIR", str(tmp_path / "keys"))
    cfg = PipelineConfig().resolved(load_settings())
    assert cfg.tracking_uri == "http://127.0.0.1:5999" and cfg.artifact_location == ""
    assert cfg.s3_endpoint == "http://127.0.0.1:9000"
    assert cfg.owner_dir == str((tmp_path / "keys").resolve())
    # the config's own model name and the CLI's are one default
    assert PipelineConfig().name == DEFAULTS.model_name == "adaloc-fashion-mnist"


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_round_trip_through_files(tmp_path, suffix):
    cfg = load_config(None, ["token=binary", "key.budget=0.1", "lr=0.02", "device=cuda:1"])
    path = tmp_path / f"saved{suffix}"
    path.write_text(cfg.to_toml() if suffix == ".toml" else cfg.to_json())
    again = load_config(path)
    assert again == cfg and again.format_version == 1


def test_literal_choices_match_the_library():
    import typing

    from adaloc.models import MODEL_NAMES
    from adaloc.token import PATTERNS
    from adaloc.tokenlock import STRATEGIES
    from pipelines import config as C

    assert set(typing.get_args(C.ModelName)) == set(MODEL_NAMES)
    assert set(typing.get_args(C.TokenPattern)) == {"", *PATTERNS} - {"image"}
    assert set(typing.get_args(C.TokenStrategy)) == set(STRATEGIES)


def test_newer_format_version_warns():
    with pytest.warns(UserWarning, match="newer"):
        from_dict({"format_version": 99})
