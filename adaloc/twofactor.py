"""Two-factor lock: an AdaLoc weights key (a site holds it) + an M-LOCK token (a client shows it).

The owner token-locks a model, then AdaLoc-locks it: the base without the key is useless, and
the authorized model (base + key) still answers correctly only for inputs carrying the token.
Key-only updates keep both factors: training is token-locked and confined to the key, so the
token stays required and every value outside the key stays bit-identical.
"""

from __future__ import annotations

from torch import nn

from adaloc.errors import KeyMismatchError
from adaloc.evaluate import accuracy
from adaloc.lock import Key, extract_key, lock, outside_key_sha256, unlock
from adaloc.token import Token
from adaloc.tokenlock import TokenLockConfig, fit_token_lock, stamp_fn


def two_factor_lock(model: nn.Module, mask, *, fill: str = "zeros", seed: int = 0):
    """Split a token-locked ``model`` into (base, key); the token stays the second factor."""
    return lock(model, mask, fill=fill, seed=seed)


def two_factor_matrix(base: nn.Module, key: Key, data, token: Token, *, batch_size: int = 256):
    """The 2x2 matrix: accuracy for key yes/no x token yes/no on ``data``."""
    authorized = unlock(base, key)
    with_token = stamp_fn(token)
    kw = {"batch_size": batch_size}
    return {
        "version": key.version,
        "key_and_token": accuracy(authorized, data, input_fn=with_token, **kw),
        "key_only": accuracy(authorized, data, **kw),
        "token_only": accuracy(base, data, input_fn=stamp_fn(token), **kw),
        "neither": accuracy(base, data, **kw),
    }


def key_only_token_update(
    base: nn.Module,
    key: Key,
    train,
    val,
    token: Token,
    cfg: TokenLockConfig,
    train_cfg,
    *,
    num_classes: int,
    progress: bool = True,
) -> tuple[Key, dict]:
    """Token-locked, key-only update: returns key version N+1 (parent N) and a report.

    Raises KeyMismatchError if anything outside the key moved (it cannot, by KeyGuard; this
    is the check an auditor would run).
    """
    model = unlock(base, key)
    before = outside_key_sha256(model, key.mask)
    info = fit_token_lock(
        model,
        train,
        val,
        token,
        cfg,
        train_cfg,
        num_classes=num_classes,
        mask=key.mask,
        desc=f"key-only update v{key.version + 1}",
        progress=progress,
    )
    after = outside_key_sha256(model, key.mask)
    if after != before:
        raise KeyMismatchError(
            f"key-only update changed values outside the key ({before[:12]} -> {after[:12]})"
        )
    new_key = extract_key(
        model, key.mask, base_sha256=key.base_sha256, version=key.version + 1, parent=key.version
    )
    info["outside_key_sha256"] = after
    return new_key, info
