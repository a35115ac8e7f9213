"""update flow (key-only): resolve the latest key -> restore -> train only the key on the new
data -> evaluate -> publish key v(N+1) with parent N -> gate -> alias. Never touches the base."""

from __future__ import annotations

from prefect import flow, get_run_logger

from pipelines import attack_tasks as AT
from pipelines import tasks as T
from pipelines import token_tasks as TT
from pipelines.config import PipelineConfig
from pipelines.flows.common import (
    config_params,
    gate,
    open_owner,
    open_registry,
    read_config,
    report,
    require_sites,
    run_name,
)
from pipelines.scratch import HOOKS as SCRATCH_HOOKS


@flow(name="update", flow_run_name=run_name("update"), log_prints=True, **SCRATCH_HOOKS)
def update_flow(
    config_path: str | None = None,
    overrides: dict | None = None,
    promote: bool = True,
    progress: bool = True,
    config: PipelineConfig | None = None,
) -> dict:
    """Publish the next key version, trained key-only on the stage of data it is due.

    promote=False publishes it as ``candidate`` only (the retrain flow promotes after its
    own evaluation). Returns the new version's record, metrics and the gate's verdict.
    """
    log = get_run_logger()
    cfg = read_config(config_path, overrides, config)
    registry, owner = open_registry(cfg), open_owner(cfg)
    require_sites(owner)
    work = T.scratch_dir()

    latest = T.latest_key_version(registry)
    if latest is None:
        raise RuntimeError(f"no key version of {cfg.name!r} is published; run the lock flow first")
    version, parent = latest.version + 1, latest.version
    data_version = T.checkout_data_version(cfg.dvc_file)
    bundle = T.load_data(cfg)
    T.checkout_data_version(cfg.dvc_file, missing_ok=False)  # the files loaded
    stage = T.make_stages(bundle, cfg)[T.stage_for_version(version, cfg.updates)]
    log.info("key v%d: key-only training on stage %r (parent v%d)", version, stage.name, parent)

    base = T.download_base(registry, latest.base_sha256, f"{work}/base")
    key, sealed_token = T.load_owner_key(
        registry, owner, cfg.owner_dir, parent, cache=cfg.caches_keys
    )
    token = TT.load_token(cfg, sealed_token) if cfg.token else None
    if token is None:
        model = T.restore(base, key)
        seconds = T.train_key(model, stage, key.mask, cfg, version, progress).seconds
        new_key = T.extract_key(model, key.mask, key.base_sha256, version, parent)
    else:
        new_key, seconds = TT.token_key_update(
            base, key, stage, token, cfg, version, bundle.num_classes, progress
        )
        model = T.restore(base, new_key)
    metrics = T.evaluate(base, new_key, stage.test, version=version, seed=cfg.seed)
    if token is not None:
        metrics = TT.with_two_factor(metrics, TT.two_factor(base, new_key, stage.test, token))
    if cfg.max_attack_leak_pt > 0:  # the attack gate prices a version before promotion
        metrics = {**metrics, **AT.attack_metrics(base, new_key, bundle, cfg, version, token)}
    passed, reasons = gate(metrics, cfg)

    params = {**config_params(cfg), "data_version": data_version, "stage": stage.name}
    kv = T.publish_key(
        registry,
        new_key,
        owner,
        version,
        parent=parent,
        model_sha256=_state_sha(model),
        metrics={**metrics, "train_seconds": seconds, "gate_passed": float(passed)},
        params=params,
        data_version=data_version,
        key_spec=cfg.key_spec().to_dict(),
        aliases=("candidate",),
        token=token,
        owner_dir=cfg.owner_dir if cfg.caches_keys else None,
    )
    version = kv.version  # MLflow's number: a concurrent publisher may have taken ours
    if passed and promote:
        kv = T.set_alias(registry, "production", version, owner)
    elif not passed:
        log.warning("key v%d stays a candidate: %s", version, "; ".join(reasons))
    T.log_files(registry, kv.run_id, [T.write_temp(work, "config.json", cfg.to_json())])
    rows = {
        "key version": version,
        "parent": parent,
        "stage": stage.name,
        **metrics,
        "key bytes (sealed)": kv.sealed_bytes,
        "data version": data_version,
        "gate": "passed" if passed else "; ".join(reasons),
        "aliases": kv.aliases,
    }
    report("update-summary", f"update {cfg.name} to v{version}", rows)
    return {
        "version": version,
        "record": kv.to_dict(),
        "metrics": metrics,
        "passed": passed,
        "reasons": reasons,
        "data_version": data_version,
        "model_sha256": _state_sha(model),
    }


def _state_sha(model) -> str:
    from adaloc.lock import state_sha256

    return state_sha256(model)
