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


def token_lock_entry(args, bundle, owner_train, test, make, space, refs, progress) -> dict | None:
    """Token-lock a fresh owner model; search the token and fine-tune without it per fraction.

    Returns the ``locks["tokenlock"]`` entry of attacks.json, or None when the token does
    not fit the images.
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
    chance = 1.0 / bundle.num_classes
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
    for frac, (data, scratch_acc) in refs.items():
        try:
            found = token_search(model, data.train, token, budget=args.token_budget, seed=args.seed)
        except TokenError as err:
            print(f"token search skipped: {err}")
            break
        acc = accuracy(model, test, input_fn=stamp_fn(found.best))
        entry["rows"].append(
            {
                "attack": "token_search",
                "fraction": frac,
                "n": data.n,
                "attacked_acc": acc,
                "scratch_acc": scratch_acc,
                "leak_pt": 100 * (acc - scratch_acc),
                "positions_precision": None,
                "positions_recall": None,
                "search": found.summary(),
                "unlocked": acc > chance + 0.05,
            }
        )
        res = search(clone_fn(model), data.train, data.val, space, desc="finetune no token")
        acc = accuracy(res.model, test)
        entry["rows"].append(
            {
                "attack": "finetune_no_token",
                "fraction": frac,
                "n": data.n,
                "attacked_acc": acc,
                "scratch_acc": scratch_acc,
                "leak_pt": 100 * (acc - scratch_acc),
                "positions_precision": None,
                "positions_recall": None,
                "chosen": {"optimizer": res.optimizer, "lr": res.lr, "steps": res.steps},
            }
        )
    return entry
