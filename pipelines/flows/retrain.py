"""retrain flow (scheduled in prefect.yaml): when the DVC data version differs from the one
the latest key version was trained on, run update + evaluate and promote only if the gate
holds. With no new data it publishes nothing."""

from __future__ import annotations

from prefect import flow, get_run_logger

from pipelines import tasks as T
from pipelines.config import PipelineConfig
from pipelines.data_version import data_changed
from pipelines.flows.common import open_owner, open_registry, read_config, report, run_name
from pipelines.flows.evaluate import evaluate_flow
from pipelines.flows.update import update_flow


@flow(name="retrain", flow_run_name=run_name("retrain"), log_prints=True)
def retrain_flow(
    config_path: str | None = None,
    overrides: dict | None = None,
    progress: bool = False,
    config: PipelineConfig | None = None,
) -> dict:
    """Update the key only if the data changed; promote to ``production`` only if it passes."""
    log = get_run_logger()
    cfg = read_config(config_path, overrides, config)
    registry, owner = open_registry(cfg), open_owner(cfg)
    # Scheduled: re-sign the timestamp first, so sites never see it expire while the owner
    # runs (a frozen or stale registry is what an expired record tells them).
    counter = T.sign_timestamp(registry, owner)
    log.info("timestamp record re-signed (counter %d)", counter)
    current = T.resolve_data_version(cfg.dvc_file)
    latest = T.latest_key_version(registry)
    if latest is None:
        raise RuntimeError(f"no key version of {cfg.name!r} is published; run the lock flow first")
    if not data_changed(current, latest.data_version):
        log.info(
            "data version %s already trained into key v%d: nothing to publish",
            current,
            latest.version,
        )
        report(
            "retrain",
            f"retrain {cfg.name}: no new data",
            {"data version": current, "latest key version": latest.version, "published": "nothing"},
        )
        return {"published": None, "data_version": current, "latest": latest.version}

    log.info("data version changed %s -> %s: updating the key", latest.data_version, current)
    updated = update_flow(promote=False, progress=progress, config=cfg)
    version = updated["version"]
    checked = evaluate_flow(ref=str(version), config=cfg)
    promoted = bool(updated["passed"] and checked["passed"])
    if promoted:
        T.set_alias(registry, "production", version, owner)
    else:
        log.warning(
            "key v%d not promoted: %s", version, "; ".join(updated["reasons"] + checked["reasons"])
        )
    report(
        "retrain",
        f"retrain {cfg.name}: key v{version}",
        {
            "data version": current,
            "previous data version": latest.data_version,
            "published": version,
            "promoted": promoted,
            **checked["metrics"],
        },
    )
    return {
        "published": version,
        "promoted": promoted,
        "data_version": current,
        "metrics": checked["metrics"],
    }
