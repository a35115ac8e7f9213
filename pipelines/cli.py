"""The ``adaloc`` command: ``demo``, the flows (``lock|update|evaluate|retrain``), and the
registry author's ``registry``, ``site`` and ``keys`` sub-commands."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from pipelines.keys_cli import keys_app
from pipelines.registry_cli import SiteDir, cli_errors, registry_app, site_app
from pipelines.settings import DEFAULTS

app = typer.Typer(
    help="Adaptable model usage control: lock a model, publish key versions, pull at sites.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _settings(ctx: typer.Context) -> None:
    """Read the shared settings (pipelines/settings.py) once, for every command."""
    from adaloc.errors import ConfigError
    from pipelines.settings import load_settings

    try:
        ctx.obj = load_settings()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    ctx.default_map = _shared_defaults(ctx.command, ctx.obj)


def _shared_defaults(root, settings) -> dict:
    """Click default_map for the registry/site/keys/serve options from the settings, so
    ``ADALOC_HOME`` moves the keyring and the store for every command at once (a flag or the
    option's own environment variable still wins)."""
    by_flag = {
        "--owner-dir": settings.owner,
        "--root": settings.home,
        "--dir": settings.site_dir,
        "--model": settings.model_name,
    }

    def defaults(command) -> dict:
        return {p.name: str(by_flag[o]) for p in command.params for o in p.opts if o in by_flag}

    out: dict = {"serve": defaults(root.commands["serve"])}
    for name in ("registry", "site", "keys"):
        group = root.commands[name]
        out[name] = {cname: defaults(c) for cname, c in group.commands.items()}
    return out


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


class _NoTraceback(logging.Filter):
    """Prefect's console shows an error as one line; the full traceback still goes to the
    Prefect API's run log, whose handler formats the record before the console does."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _one_line_console() -> None:
    """Call after Prefect is imported (its logging is configured then)."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.addFilter(_NoTraceback())


def _config(config: Path | None, sets: list[str] | None, defaults: dict | None = None, **flags):
    """defaults < shared settings (model name) < config file < flags < ``-s`` overrides."""
    from pipelines.config import load_config, parse_overrides
    from pipelines.settings import load_settings

    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides = {**overrides, **parse_overrides(sets)}
    if "key" in flags and flags["key"] and "key" in overrides:
        overrides["key"] = {**flags["key"], **overrides["key"]}
    base = {"name": load_settings().model_name, **(defaults or {})}
    return load_config(config, overrides, defaults=base)


def _print(result: dict) -> None:
    typer.echo(json.dumps(result, indent=2, default=str))


# The demo's own defaults (one quick epoch, a saliency key): below the config file, the
# flags and `-s`, so `adaloc demo -s key.budget=0.1` is what runs.
DEMO_DEFAULTS = {
    "epochs": 1,
    "key_epochs": 1,
    "updates": 2,
    "key": {"selection": "saliency", "budget": 0.05},
}


@app.command()
@cli_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the store, site, summary.")] = Path(
        "runs/demo"
    ),
    dataset: Annotated[
        str | None,
        typer.Option(help="fashion-mnist | digits | imagefolder:PATH (default fashion-mnist)"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="cnn | mlp | resnet18 | ... (default cnn)")
    ] = None,
    updates: Annotated[
        int | None,
        typer.Option(help=f"Key-only updates after the lock (default {DEMO_DEFAULTS['updates']})."),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help=f"Epochs of base training and each update (default {DEMO_DEFAULTS['epochs']})."
        ),
    ] = None,
    key_budget: Annotated[
        float | None,
        typer.Option(
            help=f"Fraction of parameters in the key (default {DEMO_DEFAULTS['key']['budget']})."
        ),
    ] = None,
    config: ConfigPath = None,
    sets: Set = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Lock -> key-only updates -> a site pulls each version -> evaluation; prints a table
    and the MLflow UI command, writes OUT/summary.json."""
    _prefect_env(quiet=True)
    import prefect  # noqa: F401 - configures Prefect's logging, filtered next

    from pipelines.demo import run_demo

    _one_line_console()

    cfg = demo_config(
        config, sets, dataset=dataset, model=model, updates=updates, epochs=epochs,
        key_budget=key_budget,
    )  # fmt: skip
    run_demo(out, cfg, force=force)


def demo_config(
    config: Path | None, sets: list[str] | None, *, key_budget: float | None = None, **flags
):
    """The demo's config: its defaults < the config file < the flags given < ``-s``."""
    epochs = flags.get("epochs")
    cfg = _config(
        config,
        sets,
        defaults=DEMO_DEFAULTS,
        key_epochs=epochs,
        key={"budget": key_budget} if key_budget is not None else None,
        **flags,
    )
    if "name" not in _explicit_fields(config, sets):  # one registered model per dataset
        cfg = cfg.replace(name="adaloc-" + cfg.dataset.split(":")[0].replace("_", "-"))
    return cfg


def _explicit_fields(config: Path | None, sets: list[str] | None) -> set[str]:
    """Fields the user set in the config file or with ``-s``."""
    from pipelines.config import load_config, parse_overrides

    return set(parse_overrides(sets)) | (load_config(config).model_fields_set if config else set())


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

    _one_line_console()

    _print(lock_flow(config=_config(config, sets), nproc=nproc))


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

    _one_line_console()

    _print(update_flow(config=_config(config, sets), promote=promote))


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

    _one_line_console()

    _print(evaluate_flow(config=_config(config, sets), ref=ref))


@app.command("retrain")
@cli_errors
def retrain_cmd(config: ConfigPath = None, sets: Set = None) -> None:
    """Update + evaluate + promote only when the DVC data version changed (flow `retrain`)."""
    _prefect_env()
    from pipelines.flows.retrain import retrain_flow

    _one_line_console()

    _print(retrain_flow(config=_config(config, sets)))


@app.command("config")
@cli_errors
def config_cmd(
    config: ConfigPath = None,
    sets: Set = None,
    help_fields: Annotated[
        bool, typer.Option("--help-fields", help="List every field: type, default, help.")
    ] = False,
    toml: Annotated[bool, typer.Option("--toml", help="Print TOML instead of JSON.")] = False,
) -> None:
    """Print the validated config (file + overrides) as JSON (or TOML), or list its fields."""
    if help_fields:
        from rich.console import Console
        from rich.table import Table

        from pipelines.config import field_help

        table = Table("field", "type", "default", "meaning")
        for row in field_help():
            table.add_row(*row)
        Console().print(table)
        return
    cfg = _config(config, sets)
    typer.echo(cfg.to_toml() if toml else cfg.to_json())


@app.command("serve")
@cli_errors
def serve_cmd(
    directory: SiteDir = DEFAULTS.site_dir,
    host: Annotated[str, typer.Option(help="Address to bind (keep 127.0.0.1 behind a proxy).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    poll: Annotated[
        float, typer.Option(help="Seconds between registry checks (0 = only POST /admin/pull).")
    ] = 30.0,
    ref: Annotated[str, typer.Option(help="Key version or alias to follow.")] = "production",
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N]")] = None,
) -> None:
    """Serve the site's model over HTTP (/predict, /healthz, /version, /metrics) and hot-swap
    each verified new key version without a restart."""
    _quiet_env()
    from pipelines.serve import serve

    serve(directory, host=host, port=port, poll_s=poll, ref=ref, device=device)


def _quiet_env() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


if __name__ == "__main__":  # `python -m pipelines.cli` = the `adaloc` command of this checkout
    app()
