"""Token side of bench/attacks.py: an M-LOCK model priced by token search and fine-tuning."""

from __future__ import annotations

import torch

from adaloc.attacks import clone_fn, search, space_bits, token_search
from adaloc.errors import TokenError
from adaloc.evaluate import accuracy
from adaloc.token import DEFAULT_BINARY_SIZE, Token
from adaloc.tokenlock import NEAR_FRAC, TokenLockConfig, fit_token_lock, stamp_fn
from adaloc.training import TrainConfig


def _token_size(args, bundle) -> int | None:
    size = args.token_size
    if size < 0:  # the library's default binary token (see adaloc.token)
        size = DEFAULT_BINARY_SIZE
    return size if size <= min(bundle.image_size) else None


def token_lock_model(args, bundle, owner_train, test, make, progress) -> tuple | None:
    """Token-lock a fresh owner model: ``(model, token, entry without rows)``, or None.

    None when the token does not fit the images.
    """
    size = _token_size(args, bundle)
    if size is None:
        print(
            f"token side skipped: a {args.token_size}-cell token does not fit {bundle.image_size}"
        )
        return None
    token = Token.generate("binary", size, args.seed + 5)
    cfg = TokenLockConfig(decoy_frac=0.5, near_frac=NEAR_FRAC)
    torch.manual_seed(args.seed)
    model = make()
    n_val = max(1, len(owner_train) // 10)
    idx = torch.arange(len(owner_train))
    train, val = owner_train.subset(idx[n_val:]), owner_train.subset(idx[:n_val])
    epochs = args.owner_epochs or (2 if len(train) >= 20_000 else 20)
    tc = TrainConfig(epochs=epochs, lr=0.05, seed=args.seed, device="cpu")
    fit_token_lock(
        model, train, val, token, cfg, tc, num_classes=bundle.num_classes, progress=progress
    )
    entry = {
        "owner_acc": accuracy(model, test, input_fn=stamp_fn(token)),
        "unauthorized_acc": accuracy(model, test),
        "key": {
            "token_pattern": "binary",
            "token_size": size,
            "space_bits": space_bits(token),
            "search_budget": args.token_budget,
            "lock": cfg.to_dict(),
        },
        "rows": [],
    }
    return model, token, entry


def token_rows(args, model, token, data, frac, test, space, num_classes) -> list[dict]:
    """Token search and fine-tuning without the token at one fraction (no scratch yet).

    The caller adds ``scratch_acc`` and ``leak_pt`` from the scratch run on the same data.
    """
    chance = 1.0 / num_classes
    rows = []
    try:
        found = token_search(model, data.train, token, budget=args.token_budget, seed=args.seed)
    except TokenError as err:
        print(f"token search skipped: {err}")
        found = None
    if found is not None:
        acc = accuracy(model, test, input_fn=stamp_fn(found.best))
        rows.append(
            {
                "attack": "token_search",
                "fraction": frac,
                "n": data.n,
                "attacked_acc": acc,
                "positions_precision": None,
                "positions_recall": None,
                "search": found.summary(),
                "unlocked": acc > chance + 0.05,
            }
        )
    res = search(clone_fn(model), data.train, data.val, space, desc="finetune no token")
    rows.append(
        {
            "attack": "finetune_no_token",
            "fraction": frac,
            "n": data.n,
            "attacked_acc": accuracy(res.model, test),
            "positions_precision": None,
            "positions_recall": None,
            "chosen": {"optimizer": res.optimizer, "lr": res.lr, "steps": res.steps},
        }
    )
    return rows


def token_lock_entry(args, bundle, owner_train, test, make, space, refs, progress) -> dict | None:
    """Token-lock a fresh owner model; search the token and fine-tune without it per fraction.

    Returns the ``locks["tokenlock"]`` entry of attacks.json, or None when the token does
    not fit the images. ``refs``: fraction -> (attacker data, scratch accuracy).
    """
    got = token_lock_model(args, bundle, owner_train, test, make, progress)
    if got is None:
        return None
    model, token, entry = got
    for frac, (data, scratch_acc) in refs.items():
        for row in token_rows(args, model, token, data, frac, test, space, bundle.num_classes):
            row.update(scratch_acc=scratch_acc, leak_pt=100 * (row["attacked_acc"] - scratch_acc))
            entry["rows"].append(row)
    return entry
