"""Prefect tasks: each wraps one ``adaloc`` or ``registry`` call (registry I/O retried when a
retry can succeed).

Tensors never leave the process (no result persistence, no input hashing): tasks run in
the flow's process and hand models and datasets over in memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.config import PipelineConfig
from pipelines.data_version import checkout_data, data_version


def transient(exc: BaseException | None) -> bool:
    """True for errors a retry can cure: the registry or S3 unreachable, a timeout, a 5xx or
    429 from a server. A version conflict, a bad signature, a missing version or a user's
    mistake fails the same way every time, so it is not retried."""
    from adaloc.errors import AdalocError
    from registry.errors import UnavailableError

    while exc is not None:
        if isinstance(exc, UnavailableError | ConnectionError | TimeoutError):
            return True
        if isinstance(exc, AdalocError):
            return False
        status = getattr(getattr(exc, "response", None), "status_code", None)
        code = getattr(exc, "error_code", None) or ""
        if status in (429, 500, 502, 503, 504) or code == "TEMPORARILY_UNAVAILABLE":
            return True
        if type(exc).__module__.split(".")[0] in ("requests", "urllib3", "botocore", "boto3"):
            name = type(exc).__name__
            if "Connect" in name or "Timeout" in name or "Endpoint" in name:
                return True
        if "API request to" in str(exc) and "failed with" in str(exc):
            return True  # MLflow's wrapper of a transport error (the cause is only __context__)
        exc = exc.__cause__ or exc.__context__
    return False


def _retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only :func:`transient` failures."""
    return transient(state.result(raise_on_failure=False))


# Registry I/O: retried, but only for errors that can pass. Local, deterministic work (files
# on this machine, training, tensor maths) is never retried: it would fail the same way.
IO = {
    "retries": 3,
    "retry_delay_seconds": [1, 5, 15],
    "retry_condition_fn": _retry_if_transient,
    "cache_policy": NO_CACHE,
}
LOCAL = {"cache_policy": NO_CACHE, "persist_result": False}


# ---------------------------------------------------------------- data
@task(name="data version", **LOCAL)
def resolve_data_version(dvc_file: str) -> str:
    """md5 of the DVC-tracked data directory (the data version a key version records)."""
    return data_version(dvc_file)


@task(name="check out data version", **LOCAL)
def checkout_data_version(dvc_file: str, *, missing_ok: bool = True) -> str:
    """The data version to train on, after DVC made the files on disk that version (pulls
    missing files; refuses, without retries, when they differ from the recorded md5).
    Flows call it before loading (``missing_ok``: a loader may fill an empty data root)
    and again after, strictly."""
    return checkout_data(dvc_file, missing_ok=missing_ok)


@task(name="load dataset", **LOCAL)
def load_data(cfg: PipelineConfig):
    """Load the dataset (capped by train_limit/test_limit) into memory."""
    import torch

    from adaloc.data import load_dataset

    bundle = load_dataset(cfg.dataset, cfg.data_root)
    if cfg.train_limit and cfg.train_limit < len(bundle.train):
        bundle.train = bundle.train.subset(torch.arange(cfg.train_limit))
    if cfg.test_limit and cfg.test_limit < len(bundle.test):
        bundle.test = bundle.test.subset(torch.arange(cfg.test_limit))
    return bundle


@task(name="make stages", **LOCAL)
def make_stages(bundle, cfg: PipelineConfig):
    """Base stage + ``cfg.updates`` update stages on disjoint data (shifts from update 2)."""
    from adaloc.data import make_stages as _make_stages

    return _make_stages(bundle, updates=cfg.updates, seed=cfg.seed)


def stage_for_version(version: int, updates: int) -> int:
    """Stage trained by key version ``version``: v1 is the lock (stage 0), v2.. cycle 1..K."""
    return 0 if version <= 1 else (version - 2) % updates + 1


# ---------------------------------------------------------------- training (adaloc)
def train_config(cfg: PipelineConfig, *, key_only: bool, seed_offset: int = 0):
    """The adaloc TrainConfig for base training or a key-only update.

    Key-only updates take their optimizer and step size from adaloc's UpdateRecipe, the
    defaults bench/lifecycle.py measured (one source); ``cfg.lr`` > 0 overrides the rate.
    """
    from adaloc.training import TrainConfig

    if key_only:
        rec = update_recipe(cfg)
        tc = rec.train_config(epochs=cfg.key_epochs, seed=cfg.seed + seed_offset, device=cfg.device)
        return tc
    kwargs = {"lr": cfg.lr} if cfg.lr else {}
    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        seed=cfg.seed + seed_offset,
        device=cfg.device,
        **kwargs,
    )


def update_recipe(cfg: PipelineConfig):
    """adaloc's key-only update recipe (its defaults; ``cfg.lr`` > 0 overrides the rate)."""
    import dataclasses

    from adaloc.adapt import UpdateRecipe

    rec = UpdateRecipe()
    return dataclasses.replace(rec, lr=cfg.lr) if cfg.lr else rec


def network(bundle, cfg: PipelineConfig):
    """``cfg.model`` for the dataset's channels, size and classes, from the global RNG."""
    from adaloc.models import build_model as _build

    return _build(
        cfg.model,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )


@task(name="build model", **LOCAL)
def build_model(bundle, cfg: PipelineConfig):
    """A fresh network for the dataset's channels, size and classes (seeded)."""
    import torch

    torch.manual_seed(cfg.seed)
    return network(bundle, cfg)


@task(name="train base", **LOCAL)
def train_base(model, train, cfg: PipelineConfig, progress: bool = True):
    """Full training of the owner's network (CUDA + AMP when present, else CPU)."""
    from adaloc.training import fit

    report = fit(
        model, train, train_config(cfg, key_only=False), desc="train base", progress=progress
    )
    model.to("cpu")
    return report


@task(name="train base (torchrun DDP)", **LOCAL)
def train_base_ddp(cfg: PipelineConfig, nproc: int, workdir: str):
    """Full training with ``torchrun --nproc_per_node nproc`` (DDP; gloo on CPU, nccl on
    CUDA); returns the trained state dict."""
    from safetensors.torch import load_file

    out = Path(workdir) / "ddp-base.safetensors"
    tc = train_config(cfg, key_only=False)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pipelines.train_ddp",
        "--dataset",
        cfg.dataset,
        "--data-root",
        cfg.data_root,
        "--model",
        cfg.model,
        "--mode",
        "full",
        "--epochs",
        str(tc.epochs),
        "--batch-size",
        str(tc.batch_size),
        "--optimizer",
        tc.optimizer,
        "--lr",
        str(tc.lr),
        "--seed",
        str(tc.seed),
        "--train-limit",
        str(cfg.train_limit),
        "--updates",
        str(cfg.updates),
        "--device",
        cfg.device,
        "--out",
        str(out),
    ]
    try:
        subprocess.run(cmd, check=True)
        return load_file(out)
    finally:
        # The fully trained model must not stay in the scratch folder once it is in memory.
        out.unlink(missing_ok=True)
        Path(f"{out}.json").unlink(missing_ok=True)


@task(name="restore model", **LOCAL)
def restore(base, key):
    """base + key -> the authorized model (bit-identical to the owner's)."""
    from adaloc.lock import unlock

    return unlock(base, key)


@task(name="key-only training", task_run_name="key-only training v{version}", **LOCAL)
def train_key(model, stage, mask, cfg: PipelineConfig, version: int, progress: bool = True):
    """Key-only update on ``stage`` with adaloc's recipe (budget chosen on ``stage.val``).

    KeyGuard keeps everything outside the key bit-identical; ``cfg.key_epochs`` is the floor.
    """
    from adaloc.adapt import adapt

    report = adapt(
        model,
        stage.train,
        stage.val,
        mask=mask,
        recipe=update_recipe(cfg),
        epochs=cfg.key_epochs,
        seed=cfg.seed + version,
        device=cfg.device,
        desc=f"key-only v{version}",
        progress=progress,
    )
    model.to("cpu")
    return report


@task(name="extract key", task_run_name="extract key v{version}", **LOCAL)
def extract_key(model, mask, base_sha256: str, version: int, parent: int | None):
    """The key values after key-only training, as key version ``version``."""
    from adaloc.lock import extract_key as _extract

    return _extract(model, mask, base_sha256=base_sha256, version=version, parent=parent)


@task(name="evaluate lock", task_run_name="evaluate v{version}", **LOCAL)
def evaluate(base, key, test, version: int, seed: int = 0) -> dict:
    """Authorized / unauthorized / random-key accuracy and chance on ``test``."""
    from adaloc.evaluate import evaluate_lock

    return evaluate_lock(base, key, test, seed=seed + version)


@task(name="per-class accuracy", **LOCAL)
def per_class(model, test, num_classes: int, token=None) -> list[float]:
    """Per-class accuracy of a model (for the evaluation plots); inputs stamped with
    ``token`` when given, as an authorized user of a token-locked model sends them."""
    from adaloc.evaluate import per_class_accuracy

    if token is None:
        return per_class_accuracy(model, test, num_classes)
    from adaloc.tokenlock import stamp_fn

    return per_class_accuracy(model, test, num_classes, input_fn=stamp_fn(token))


# ---------------------------------------------------------------- owner's files
@task(name="save base", **LOCAL)
def save_base(base, cfg: PipelineConfig, bundle, directory: str) -> dict:
    """base.safetensors + model.json in ``directory``; returns sha256 and bytes."""
    from adaloc.artifact import ModelCard
    from adaloc.artifact import save_base as _save

    card = ModelCard(
        builder=cfg.model,
        kwargs={
            "in_channels": bundle.in_channels,
            "num_classes": bundle.num_classes,
            "image_size": list(bundle.image_size),
        },
        num_classes=bundle.num_classes,
        input_shape=[bundle.in_channels, *bundle.image_size],
        key_spec={k: v for k, v in cfg.key_spec().to_dict().items() if k != "seed"},
    )
    return _save(base, card, directory)


def owner_key_path(owner_dir: str, version: int) -> Path:
    """Where the owner keeps the plain key version (never uploaded; mode 0600)."""
    return Path(owner_dir) / "keys" / f"key-v{version}.safetensors"


@task(name="keep key", task_run_name="keep key v{version}", **LOCAL)
def keep_key(key, owner_dir: str, version: int) -> str:
    """Write the plain key into the owner's private key store; never overwrite a kept key.

    The file appears complete (0600, in a 0700 folder) or not at all; an existing file with
    other bytes is refused (VersionConflictError), the same bytes are accepted (a retry).
    """
    from dataclasses import replace

    from adaloc.artifact import encode_key
    from adaloc.fsutil import atomic_write_bytes, private_dir
    from registry.errors import VersionConflictError

    path = owner_key_path(owner_dir, version)
    private_dir(path.parent)
    data = encode_key(replace(key, version=version))
    if path.exists():
        if path.read_bytes() == data:
            return str(path)
        raise VersionConflictError(
            f"{path} already holds another key v{version}; kept keys are never overwritten"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write_bytes(tmp, data, mode=0o600)
    try:
        os.link(tmp, path)  # fails if a concurrent writer got there first: no overwrite
    except FileExistsError:
        if path.read_bytes() != data:
            raise VersionConflictError(
                f"{path} was kept concurrently with other bytes; kept keys are never overwritten"
            ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


@task(name="load key", task_run_name="load key v{version}", **IO | {"persist_result": False})
def load_owner_key(registry, owner, owner_dir: str, version: int, *, cache: bool = True):
    """(key version ``version``, its sealed token bytes or None): from the owner's cache when
    it holds the file, else the owner's sealed copy in the registry (verified against the
    signed records), kept in the cache when ``cache`` is on. Never a persisted result."""
    from adaloc.artifact import load_key
    from registry.owner_copy import open_owner_copy

    path = owner_key_path(owner_dir, version)
    if cache and path.exists():
        return load_key(path), None
    key, token = open_owner_copy(registry, owner, version)
    if cache:
        keep_key.fn(key, owner_dir, version)
    return key, token


# ---------------------------------------------------------------- registry (I/O)
@task(name="publish base", **IO)
def publish_base(registry, directory: str, base_sha256: str, params: dict, metrics: dict):
    """Publish the locked base once (idempotent: an existing base is returned as is)."""
    return registry.publish_base(directory, base_sha256=base_sha256, params=params, metrics=metrics)


@task(name="publish key", task_run_name="publish key (after v{version})", **IO)
def publish_key(registry, key, owner, version: int, *, owner_dir: str | None = None, **kwargs):
    """Seal and publish a key version; MLflow's version number is the version (one source).

    ``version`` is the caller's expectation only: a concurrent publisher may have taken it,
    then this one gets the next number. With ``owner_dir`` the plain key is cached there
    under that number afterwards (never overwriting a kept key); the registry's owner copy
    is what other workers open. Retries reuse the same publication.
    """
    kv = registry.publish_key(key, owner=owner, auto_version=True, **kwargs)
    if owner_dir is not None:
        keep_key.fn(key, owner_dir, kv.version)
    return kv


@task(name="set alias", task_run_name="alias {alias} -> v{version}", **IO)
def set_alias(registry, alias: str, version: int, owner=None):
    """Sign "``alias`` = key version ``version``" with the owner key (production: promotion)."""
    return registry.set_alias(alias, version, owner=owner)


@task(name="sign timestamp", **IO)
def sign_timestamp(registry, owner) -> int:
    """Re-sign the timestamp record (new expiry); sites refuse one past its expiry."""
    return registry.sign_timestamp(owner)


@task(name="latest key version", **IO)
def latest_key_version(registry):
    """The newest ready key version, or None when nothing is published."""
    from registry.errors import NotFoundError

    try:
        return registry.resolve("latest")
    except NotFoundError:
        return None


@task(name="resolve key version", task_run_name="resolve {ref}", **IO)
def resolve_version(registry, ref: str):
    """A ready key version by number or alias."""
    return registry.resolve(ref)


@task(name="download base", **IO)
def download_base(registry, base_sha256: str, dst_dir: str):
    """Download the published base and load it."""
    from adaloc.artifact import load_base

    folder = registry.download_base(registry.base(base_sha256), dst_dir)
    return load_base(folder)[0]


@task(name="log files", **IO)
def log_files(registry, run_id: str, files: list[str], artifact_path: str = "pipeline"):
    """Attach files (config, plots, summaries) to an MLflow run."""
    for f in files:
        registry.client.log_artifact(run_id, f, artifact_path)


@task(name="log metrics", **IO)
def log_metrics(registry, run_id: str, metrics: dict):
    """Log metrics on an MLflow run (e.g. evaluation figures on the version's run)."""
    for k, v in metrics.items():
        if v is not None:
            registry.client.log_metric(run_id, k, float(v))


def write_temp(directory: str, name: str, text: str) -> str:
    """Write a small text file (config.json, report.md) for logging; return its path."""
    path = Path(directory) / name
    path.write_text(text)
    return str(path)


def scratch_dir() -> str:
    """A fresh 0700 temporary folder for a flow's files, removed when the flow run ends."""
    from pipelines.scratch import scratch_dir as _scratch

    return _scratch()
