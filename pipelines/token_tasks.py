"""Prefect tasks for the optional M-LOCK token (the second factor): each wraps one adaloc call.

Enabled by ``token = "<pattern>"`` in the config (empty = off). The token is a secret like the
key: the owner keeps it in ``owner_dir/token.json`` (mode 0600) and the registry seals it next
to each key version; only its fingerprint is ever logged.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.config import PipelineConfig
from pipelines.tasks import train_config

LOCAL = {"cache_policy": NO_CACHE, "persist_result": False}


def token_path(owner_dir: str) -> Path:
    """Where the owner keeps the plain token (never uploaded in plain text)."""
    return Path(owner_dir) / "token.json"


def lock_config(cfg: PipelineConfig):
    """The TokenLockConfig of the flows: the config's strategy, decoy hardening on.

    As in the hardened recipe (``bench/tokenlock.py``), a share ``NEAR_FRAC`` of the
    random-token decoys are near misses of the true token.
    """
    from adaloc.tokenlock import NEAR_FRAC, TokenLockConfig

    near = NEAR_FRAC if cfg.token_decoys > 0 else 0.0
    return TokenLockConfig(strategy=cfg.token_strategy, decoy_frac=cfg.token_decoys, near_frac=near)


@task(name="make token", **LOCAL)
def make_token(cfg: PipelineConfig):
    """A new secret token of the config's pattern and size, drawn from the OS CSPRNG.

    Never from ``cfg.seed``: the seed is logged as an MLflow param, and a token derived from
    it could be rebuilt from the registry. Kept by the owner in a 0600 file.
    """
    from adaloc.fsutil import private_dir
    from adaloc.token import MIN_SECRET_BITS, Token

    token = Token.generate(cfg.token, cfg.token_size or None)
    bits = token.entropy_bits()
    if bits < MIN_SECRET_BITS:
        get_run_logger().warning(
            "token %s %dx%d has %.0f bits of entropy (< %d): a search can find it",
            token.pattern, token.size, token.size, bits, MIN_SECRET_BITS,
        )  # fmt: skip
    path = token_path(cfg.owner_dir)
    private_dir(path.parent)
    token.save(path)  # atomic, 0600 from the start
    return token


@task(name="load token", **LOCAL)
def load_token(cfg: PipelineConfig, sealed: bytes | None = None):
    """The owner's token: the one sealed with the parent key version when given (the
    registry's copy, which every worker can open), else the lock flow's local file."""
    from adaloc.token import Token

    if sealed is not None:
        return Token.from_bytes(sealed)
    return Token.load(token_path(cfg.owner_dir))


@task(name="token-lock training", **LOCAL)
def token_lock(model, stage, token, cfg: PipelineConfig, num_classes: int, progress: bool):
    """Train the whole network to answer only for stamped inputs (before the key is chosen)."""
    from adaloc.tokenlock import fit_token_lock

    tc = train_config(cfg, key_only=False)
    info = fit_token_lock(
        model,
        stage.train,
        stage.val,
        token,
        lock_config(cfg),
        tc,
        num_classes=num_classes,
        progress=progress,
    )
    model.to("cpu")
    return info


@task(name="token key-only update", task_run_name="token key-only update v{version}", **LOCAL)
def token_key_update(
    base, key, stage, token, cfg: PipelineConfig, version: int, num_classes: int, progress: bool
):
    """Key-only update that keeps the token required; returns (key version, seconds)."""
    from adaloc.twofactor import key_only_token_update

    tc = train_config(cfg, key_only=True, seed_offset=version)
    t0 = time.perf_counter()
    new_key, _ = key_only_token_update(
        base,
        key,
        stage.train,
        stage.val,
        token,
        lock_config(cfg),
        tc,
        num_classes=num_classes,
        progress=progress,
    )
    return new_key, time.perf_counter() - t0


@task(name="two-factor matrix", **LOCAL)
def two_factor(base, key, test, token) -> dict:
    """Accuracy for key yes/no x token yes/no."""
    from adaloc.twofactor import two_factor_matrix

    m = two_factor_matrix(base, key, test, token)
    return {f"two_factor_{k}": v for k, v in m.items() if k != "version"}


def with_two_factor(metrics: dict, tf: dict) -> dict:
    """Metrics of a token-locked version: authorized means key *and* token."""
    return {**metrics, **tf, "authorized_acc": tf["two_factor_key_and_token"]}
