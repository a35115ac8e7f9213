"""The ``adaloc`` command: ``demo``, the flows (``lock|update|evaluate|retrain``), and the
registry author's ``registry``, ``site`` and ``keys`` sub-commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from pipelines.keys_cli import keys_app
from pipelines.registry_cli import cli_errors, registry_app, site_app

app = typer.Typer(
    help="Adaptable model usage control: lock a model, publish key versions, pull at sites.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")
app.add_typer(site_app, name="site")
app.add_typer(keys_app, name="keys")

ConfigPath = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML/YAML/JSON config file.")
]
Set = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field: field=value (repeatable)."),
]


def _prefect_env(quiet: bool = False) -> None:
    """Settings that make a local run robust on a busy machine (before Prefect is imported)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _config(config: Path | None, sets: list[str] | None, **flags):
    from pipelines.config import load_config, parse_overrides

    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_overrides(sets))
    return load_config(config, overrides)


def _print(result: dict) -> None:
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
@cli_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the store, site, summary.")] = Path(
        "runs/demo"
    ),
    dataset: Annotated[str, typer.Option(help="fashion-mnist | digits | imagefolder:PATH")] = (
        "fashion-mnist"
    ),
    model: Annotated[str, typer.Option(help="cnn | mlp | resnet18 | ...")] = "cnn",
    updates: Annotated[int, typer.Option(help="Key-only updates after the lock.")] = 2,
    epochs: Annotated[int, typer.Option(help="Epochs of base training and of each update.")] = 1,
    key_budget: Annotated[float, typer.Option(help="Fraction of parameters in the key.")] = 0.05,
    config: ConfigPath = None,
    sets: Set = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Lock -> key-only updates -> a site pulls each version -> evaluation; prints a table
    and the MLflow UI command, writes OUT/summary.json."""
    _prefect_env(quiet=True)
    from pipelines.demo import run_demo

    name = "adaloc-" + dataset.split(":")[0].replace("_", "-")
    cfg = _config(
        config,
        sets,
        dataset=dataset,
        model=model,
        updates=updates,
        epochs=epochs,
        key_epochs=epochs,
        name=name,
    )
    cfg = cfg.replace(key={"selection": "saliency", **cfg.key, "budget": key_budget})
    run_demo(out, cfg, force=force)


@app.command("lock")
@cli_errors
def lock_cmd(
    config: ConfigPath = None,
    sets: Set = None,
    nproc: Annotated[int, typer.Option(help="Processes for torchrun/DDP base training.")] = 1,
) -> None:
    """Train, lock and publish the base once + key version 1 (Prefect flow `lock`)."""
    _prefect_env()
    from pipelines.flows.lock import lock_flow

    cfg = _config(config, sets)
    _print(lock_flow(overrides=cfg.to_dict(), nproc=nproc))


@app.command("update")
@cli_errors
def update_cmd(
    config: ConfigPath = None,
    sets: Set = None,
    promote: Annotated[bool, typer.Option(help="Move `production` when the gate holds.")] = True,
) -> None:
    """Publish the next key version trained key-only (Prefect flow `update`)."""
    _prefect_env()
    from pipelines.flows.update import update_flow

    _print(update_flow(overrides=_config(config, sets).to_dict(), promote=promote))


@app.command("evaluate")
@cli_errors
def evaluate_cmd(
    ref: Annotated[str, typer.Argument(help="Key version number or alias.")] = "production",
    config: ConfigPath = None,
    sets: Set = None,
) -> None:
    """Evaluate a key version; metrics and plots go to its MLflow run (flow `evaluate`)."""
    _prefect_env()
    from pipelines.flows.evaluate import evaluate_flow

    _print(evaluate_flow(overrides=_config(config, sets).to_dict(), ref=ref))


@app.command("retrain")
@cli_errors
def retrain_cmd(config: ConfigPath = None, sets: Set = None) -> None:
    """Update + evaluate + promote only when the DVC data version changed (flow `retrain`)."""
    _prefect_env()
    from pipelines.flows.retrain import retrain_flow

    _print(retrain_flow(overrides=_config(config, sets).to_dict()))


@app.command("config")
@cli_errors
def config_cmd(config: ConfigPath = None, sets: Set = None) -> None:
    """Print the validated config (file + overrides) as JSON."""
    typer.echo(_config(config, sets).to_json())
