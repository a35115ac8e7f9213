"""What every flow does first: read the config, open the registry and the owner's keyring,
print and log the config, judge the quality gate, and write a markdown summary."""

from __future__ import annotations

import json
import os

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipelines.config import PipelineConfig, load_config
from pipelines.settings import load_settings


def read_config(
    config_path: str | None, overrides: dict | list | None, config: PipelineConfig | None = None
) -> PipelineConfig:
    """The validated config of a flow run (a typed ``config``, or a file, each under the
    ``overrides``), with the shared defaults filled in (pipelines/settings.py)."""
    from adaloc.errors import ConfigError

    settings = load_settings()
    if config is not None and config_path:
        raise ConfigError(f"pass config or config_path ({config_path!r}), not both")
    defaults = config.to_dict() if config is not None else {"name": settings.model_name}
    cfg = load_config(config_path, overrides, defaults=defaults).resolved(settings)
    if cfg.s3_endpoint:
        # boto3 (MLflow's S3 artifact store) reads the endpoint from here
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = cfg.s3_endpoint
    get_run_logger().info("config:\n%s", cfg.to_json())
    return cfg


def open_registry(cfg: PipelineConfig):
    """KeyRegistry over the config's tracking URI and artifact location."""
    from registry import KeyRegistry

    return KeyRegistry(cfg.tracking_uri, cfg.name, artifact_location=cfg.artifact_location or None)


def open_owner(cfg: PipelineConfig, *, create: bool = True):
    """The owner's keyring (signing and recipient keys + authorized sites): from the Prefect
    Secret block ``owner_secret_block`` when set, else the folder ``owner_dir`` (created on
    first use when ``create``; a flow that only reads opens an existing one)."""
    from pathlib import Path

    from registry import OwnerKeyring

    if cfg.owner_secret_block:
        from pipelines.owner_secrets import keyring_from_block
        from pipelines.scratch import scratch_dir

        return keyring_from_block(cfg.owner_secret_block, Path(scratch_dir()) / "owner")
    if not create or (Path(cfg.owner_dir) / "owner.key").exists():
        return OwnerKeyring(cfg.owner_dir)
    return OwnerKeyring.init(cfg.owner_dir)


def require_sites(owner) -> None:
    """Fail before training when no site could open what would be published."""
    from adaloc.errors import ConfigError

    if not owner.recipients():
        raise ConfigError(
            f"owner keyring {str(owner.directory)!r} authorizes no site, so a key version "
            "could not be sealed for anyone; add one with `adaloc keys site-add ID SITE_PUB`"
        )


def config_params(cfg: PipelineConfig) -> dict:
    """The config flattened to MLflow params (key spec fields as ``key.<field>``)."""
    out = {}
    for k, v in cfg.to_dict().items():
        if k == "key":
            out.update({f"key.{kk}": vv for kk, vv in cfg.key_spec().to_dict().items()})
        else:
            out[k] = v
    return {k: str(v)[:500] for k, v in out.items()}


def gate(metrics: dict, cfg: PipelineConfig) -> tuple[bool, list[str]]:
    """Quality gate: authorized >= threshold and unauthorized <= chance + margin; with
    ``max_attack_leak_pt`` set, the attack leak at 1% and 5% of the data must not exceed it."""
    reasons = []
    if metrics["authorized_acc"] < cfg.authorized_threshold:
        reasons.append(
            f"authorized {metrics['authorized_acc']:.4f} < threshold {cfg.authorized_threshold}"
        )
    limit = metrics["chance"] + cfg.unauthorized_margin
    if metrics["unauthorized_acc"] > limit:
        reasons.append(
            f"unauthorized {metrics['unauthorized_acc']:.4f} > chance+margin {limit:.4f}"
        )
    limit_pt = cfg.max_attack_leak_pt
    if limit_pt > 0:  # 0 = off
        leaks = [metrics.get(f"attack_leak_pt_{p}") for p in ("1pct", "5pct")]
        if any(v is None for v in leaks):
            reasons.append("max_attack_leak_pt is set but the attack subset did not run")
        elif max(leaks) > limit_pt:
            reasons.append(f"attack leak {max(leaks):.2f} pt > max_attack_leak_pt {limit_pt}")
    return not reasons, reasons


def report(key: str, title: str, rows: dict, extra: str = "") -> str:
    """Publish a markdown table as a Prefect artifact; return the markdown."""
    lines = [f"# {title}", "", "| field | value |", "|---|---|"]
    for k, v in rows.items():
        shown = f"{v:.4f}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list) else v
        lines.append(f"| {k} | {shown} |")
    md = "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"
    try:
        create_markdown_artifact(markdown=md, key=key, description=title)
    except Exception as err:  # an artifact is a nicety; never fail a publication over it
        get_run_logger().warning("could not create markdown artifact: %s", err)
    return md


def run_name(stage: str):
    """A flow_run_name callable: '<stage>-<model name>-<time>' from the run's parameters."""

    def _name() -> str:
        from datetime import UTC, datetime

        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        overrides = params.get("overrides") or {}
        name = overrides.get("name") if isinstance(overrides, dict) else None
        config = params.get("config")
        if name is None and config is not None:
            name = config.get("name") if isinstance(config, dict) else getattr(config, "name", None)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return f"{stage}-{name or 'adaloc'}-{stamp}"

    return _name
