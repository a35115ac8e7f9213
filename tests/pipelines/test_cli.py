"""The operator surface: bad config values stop before any work, with the field named in one
line; the demo's `-s` wins over its flag defaults; remote errors are one line; retries go
only to errors a retry can cure."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipelines.cli import app, demo_config
from registry.local_servers import free_port


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty ADALOC_HOME and no tracking server: where every default points."""
    monkeypatch.setenv("ADALOC_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_TRACKING_URI", "ADALOC_TRACKING_URI", "ADALOC_OWNER_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "setting, field",
    [
        ("token=binry", "token"),
        ("token_strategy=single-target", "token_strategy"),
        ("key.budget=-0.2", "budget"),
        ("device=tpu", "device"),
        ("epochs=-1", "epochs"),
        ("optimizer=lion", "optimizer"),
        ("authorized_threshold=2", "authorized_threshold"),
        ("model=vgg", "model"),
    ],
)
@pytest.mark.parametrize("command", ["lock", "update", "demo"])
def test_bad_value_fails_before_any_work(home, tmp_path, command, setting, field):
    args = [command, "-s", setting] + (
        ["--out", str(tmp_path / "demo")] if command == "demo" else []
    )
    res = _run(*args)
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config field"), res.output
    assert field in lines[0]
    assert "Traceback" not in res.output
    # nothing was trained, registered or written: no store, no keyring, no demo folder
    assert not home.exists() and not (tmp_path / "demo").exists()


def test_prefect_validates_the_typed_config_parameter():
    from pipelines.flows.lock import lock_flow

    with pytest.raises(Exception, match="token"):
        lock_flow.validate_parameters({"config": {"token": "binry"}})
    ok = lock_flow.validate_parameters({"config": {"token": "binary"}})
    assert ok["config"].token == "binary"


def test_demo_set_overrides_win_over_flag_defaults():
    cfg = demo_config(None, ["key.budget=0.1"])
    assert cfg.key_spec().budget == 0.1 and cfg.key_spec().selection == "saliency"
    assert (cfg.epochs, cfg.key_epochs, cfg.updates) == (1, 1, 2)
    assert cfg.name == "adaloc-fashion-mnist"
    cfg = demo_config(None, ["epochs=3"], key_budget=0.2, dataset="digits", epochs=2)
    assert (cfg.epochs, cfg.key_epochs, cfg.key_spec().budget) == (3, 2, 0.2)
    assert cfg.name == "adaloc-digits"
    assert demo_config(None, ["name=mine"], dataset="digits").name == "mine"


def test_config_command_lists_fields_and_round_trips(home, tmp_path):
    res = _run("config", "--help-fields")
    assert res.exit_code == 0 and "token_strategy" in res.output
    res = _run("config", "--toml", "-s", "token=binary")
    path = tmp_path / "c.toml"
    path.write_text(res.stdout)
    again = _run("config", "-c", str(path))
    assert again.exit_code == 0 and '"token": "binary"' in again.stdout


def test_registry_and_keys_commands_use_the_flows_locations(home):
    """With no flags, `adaloc keys` writes the keyring the flows read (ADALOC_HOME/owner) and
    `adaloc registry` opens the store the flows write (ADALOC_HOME/mlflow.db)."""
    res = _run("keys", "owner-init")
    assert res.exit_code == 0 and (home / "owner" / "owner.key").exists(), res.output
    from pipelines.config import PipelineConfig
    from pipelines.settings import load_settings

    cfg = PipelineConfig().resolved(load_settings())
    assert cfg.owner_dir == str((home / "owner").resolve())
    assert cfg.tracking_uri == f"sqlite:///{home.resolve() / 'mlflow.db'}"
    res = _run("registry", "ls", "--json")  # nothing published yet: names where it looked
    assert res.exit_code == 1 and str(home / "mlflow.db") in res.output, res.output


def test_unreachable_server_is_one_line(home, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    res = _run("registry", "ls", "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: registry unavailable"), res.output


@pytest.mark.parametrize("kind", ["botocore", "boto3"])
def test_boto_errors_are_one_line(kind, capsys):
    import typer
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import EndpointConnectionError

    from pipelines.registry_cli import cli_errors

    @cli_errors
    def command():
        if kind == "botocore":
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket")
        raise S3UploadFailedError("Failed to upload key.sealed to bucket/key: Access Denied")

    with pytest.raises(typer.Exit):
        command()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: registry unavailable")


def test_retries_only_where_a_retry_can_pass():
    import requests
    from mlflow.exceptions import MlflowException

    from adaloc.errors import ConfigError
    from pipelines import tasks as T
    from registry.errors import IntegrityError, UnavailableError, VersionConflictError

    assert T.transient(UnavailableError("registry down"))
    assert T.transient(ConnectionRefusedError())
    assert T.transient(requests.exceptions.ConnectionError("refused"))
    assert T.transient(MlflowException("API request to http://x failed with exception boom"))
    for permanent in (
        VersionConflictError("v2 exists with other content"),
        IntegrityError("sha256 differs"),
        ConfigError("bad"),
        FileNotFoundError("owner/keys/key-v3.safetensors"),
        MlflowException("RESOURCE_ALREADY_EXISTS"),
    ):
        assert not T.transient(permanent), permanent
    remote_tasks = (T.publish_key, T.publish_base, T.set_alias, T.download_base, T.log_files)
    for remote in (*remote_tasks, T.load_owner_key):  # the owner copy comes from the registry
        assert remote.retries == 3 and remote.retry_condition_fn is T._retry_if_transient
    for local in (T.load_data, T.keep_key, T.resolve_data_version, T.train_key):
        assert local.retries == 0, local.name
