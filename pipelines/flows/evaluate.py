"""evaluate flow: authorized / unauthorized / random-key accuracy for any key version, the
fast attack subset (what a stolen base is worth), with metrics and PNG plots logged to that
version's MLflow run."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from pipelines import attack_tasks as AT
from pipelines import plots
from pipelines import tasks as T
from pipelines import token_tasks as TT
from pipelines.config import PipelineConfig
from pipelines.flows.common import gate, open_owner, open_registry, read_config, report, run_name
from pipelines.scratch import HOOKS as SCRATCH_HOOKS


@flow(name="evaluate", flow_run_name=run_name("evaluate"), log_prints=True, **SCRATCH_HOOKS)
def evaluate_flow(
    config_path: str | None = None,
    overrides: dict | None = None,
    ref: str = "production",
    config: PipelineConfig | None = None,
) -> dict:
    """Evaluate key version ``ref`` (number or alias) on the test data of its stage."""
    cfg = read_config(config_path, overrides, config)
    registry, owner = open_registry(cfg), open_owner(cfg, create=False)
    work = T.scratch_dir()

    kv = T.resolve_version(registry, str(ref))
    bundle = T.load_data(cfg)
    stage = T.make_stages(bundle, cfg)[T.stage_for_version(kv.version, cfg.updates)]
    base = T.download_base(registry, kv.base_sha256, f"{work}/base")
    key, sealed_token = T.load_owner_key(
        registry, owner, cfg.owner_dir, kv.version, cache=cfg.caches_keys
    )
    metrics = T.evaluate(base, key, stage.test, version=kv.version, seed=cfg.seed)
    token = TT.load_token(cfg, sealed_token) if cfg.token else None
    if token is not None:
        metrics = TT.with_two_factor(metrics, TT.two_factor(base, key, stage.test, token))
    attacks = AT.attack_metrics(base, key, bundle, cfg, kv.version, token)
    metrics = {**metrics, **attacks}
    # "authorized" = key and token: a token-locked model is scored on stamped inputs
    classes = T.per_class(T.restore(base, key), stage.test, bundle.num_classes, token)
    passed, reasons = gate(metrics, cfg)

    title = f"{cfg.name} key v{kv.version} ({stage.name})"
    files = [
        plots.lock_bars(metrics, Path(work) / "lock_accuracy.png", title),
        plots.per_class_bars(classes, bundle.classes, Path(work) / "per_class.png", title),
        T.write_temp(work, "config.json", cfg.to_json()),
    ]
    # attack metrics keep their own names (what auditors query); the rest get eval_
    named = {k if k in attacks else f"eval_{k}": v for k, v in metrics.items()}
    T.log_metrics(registry, kv.run_id, named)
    T.log_files(registry, kv.run_id, files, "evaluation")
    rows = {
        "key version": kv.version,
        "stage": stage.name,
        **metrics,
        "gate": "passed" if passed else "; ".join(reasons),
        "aliases": kv.aliases,
    }
    report("evaluation", f"evaluate {title}", rows)
    return {
        "version": kv.version,
        "metrics": metrics,
        "passed": passed,
        "reasons": reasons,
        "per_class": classes,
    }
