"""lock flow: data (DVC version) -> train base -> select key -> lock -> evaluate ->
publish base once + key v1 -> quality gate -> alias."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from pipelines import attack_tasks as AT
from pipelines import lock_tasks as LT
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


@flow(name="lock", flow_run_name=run_name("lock"), log_prints=True, **SCRATCH_HOOKS)
def lock_flow(
    config_path: str | None = None,
    overrides: dict | None = None,
    nproc: int = 1,
    progress: bool = True,
    config: PipelineConfig | None = None,
) -> dict:
    """Train and lock a model; publish its base once and key version 1.

    nproc > 1 trains the base with ``torchrun`` (DDP: nccl on GPUs, gloo on CPU).
    Returns the key version's record plus metrics and the gate's verdict.
    """
    log = get_run_logger()
    cfg = read_config(config_path, overrides, config)
    registry, owner = open_registry(cfg), open_owner(cfg)
    require_sites(owner)
    work = T.scratch_dir()

    data_version = T.checkout_data_version(cfg.dvc_file)
    bundle = T.load_data(cfg)
    T.checkout_data_version(cfg.dvc_file, missing_ok=False)  # the files loaded
    stages = T.make_stages(bundle, cfg)
    model = T.build_model(bundle, cfg)
    if nproc > 1:
        model.load_state_dict(T.train_base_ddp(cfg, nproc, work))
        seconds = None
    else:
        seconds = T.train_base(model, stages[0].train, cfg, progress).seconds
    token = TT.make_token(cfg) if cfg.token else None
    if token is not None:
        TT.token_lock(model, stages[0], token, cfg, bundle.num_classes, progress)
    mask = LT.select_key(model, cfg, stages[0].train)
    if token is None:
        model = LT.harden(model, mask, stages[0].train, bundle, cfg)
    elif LT.hardens(model):  # the probe objective trains on unstamped inputs: not with M-LOCK
        log.warning("%s with a token: the norm-free hardening is skipped", cfg.model)
    from adaloc.lock import DONOR_FILLS

    fill, donor = LT.lock_fill(model, token), None
    if fill in DONOR_FILLS:  # the norm-free default: a second network's public-like rows
        donor = LT.train_decoy_donor(model, mask, stages[0].train, bundle, cfg, progress)
    base, key = LT.lock_model(model, mask, cfg.seed, fill=fill, donor=donor)
    del donor
    metrics = T.evaluate(base, key, stages[0].test, version=1, seed=cfg.seed)
    if token is not None:
        metrics = TT.with_two_factor(metrics, TT.two_factor(base, key, stages[0].test, token))
    owner_model_sha = _state_sha(T.restore(base, key))

    saved = T.save_base(base, cfg, bundle, str(Path(work) / "base"))
    params = {**config_params(cfg), "data_version": data_version, "stage": stages[0].name}
    bv = T.publish_base(
        registry,
        str(Path(work) / "base"),
        saved["sha256"],
        params,
        {"train_seconds": seconds} if seconds else {},
    )
    if cfg.max_attack_leak_pt > 0:  # the attack gate prices a version before promotion
        metrics = {**metrics, **AT.attack_metrics(base, key, bundle, cfg, 1, token)}
    passed, reasons = gate(metrics, cfg)
    kv = T.publish_key(
        registry,
        key,
        owner,
        1,
        parent=None,
        model_sha256=owner_model_sha,
        metrics={**metrics, "base_bytes": saved["bytes"], "gate_passed": float(passed)},
        params=params,
        data_version=data_version,
        key_spec=cfg.key_spec().to_dict(),
        aliases=("candidate",),
        token=token,
        owner_dir=cfg.owner_dir if cfg.caches_keys else None,
    )
    if passed:
        kv = T.set_alias(registry, "production", kv.version, owner)
    else:
        log.warning("key v1 stays a candidate: %s", "; ".join(reasons))
    T.log_files(registry, kv.run_id, [T.write_temp(work, "config.json", cfg.to_json())])
    rows = {
        "key version": 1,
        "base mlflow version": bv.mlflow_version,
        **metrics,
        "key bytes (sealed)": kv.sealed_bytes,
        "base bytes": saved["bytes"],
        "data version": data_version,
        "gate": "passed" if passed else "; ".join(reasons),
        "aliases": kv.aliases,
    }
    report("lock-summary", f"lock {cfg.name}", rows)
    return {
        "version": 1,
        "record": kv.to_dict(),
        "metrics": metrics,
        "passed": passed,
        "base_bytes": saved["bytes"],
        "data_version": data_version,
        "model_sha256": owner_model_sha,
        "base": bv.to_dict(),
    }


def _state_sha(model) -> str:
    from adaloc.lock import state_sha256

    return state_sha256(model)
