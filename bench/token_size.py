"""Accuracy cost of the default M-LOCK token: binary 4x4 (16 bits) vs 12x12 (144 bits).

    python bench/token_size.py --data-root data --out runs/token_size

Trains one unlocked CNN, then token-locks a copy per token size with the flows' hardened
recipe (single_target, decoys with near misses) from the same unlocked model, and evaluates
with / without / forged / near-miss tokens on the test set, plus a tolerance curve
(accuracy with tokens that differ from the true one in exactly k cells) and the effective
entropy it implies. Writes DIR/token_size.json and
DIR/token_size.png. Tokens come from the OS CSPRNG (the default); they are not written.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from adaloc.data import load_dataset, make_stages
from adaloc.evaluate import accuracy
from adaloc.models import build_model
from adaloc.token import DEFAULT_BINARY_SIZE, Token
from adaloc.tokenlock import (
    NEAR_FRAC,
    TokenLockConfig,
    fit_token_lock,
    stamp_fn,
    token_lock_metrics,
)
from adaloc.training import TrainConfig, fit


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--dataset", default="fashion-mnist")
    a("--data-root", default="data")
    a("--out", default="runs/token_size")
    a("--sizes", default=f"4,{DEFAULT_BINARY_SIZE}", help="comma list of binary token sides")
    a("--train-size", type=int, default=12000)
    a("--val-size", type=int, default=1000)
    a("--eval-size", type=int, default=2000, help="test images for forged/near tokens")
    a("--pretrain-epochs", type=int, default=2)
    a("--epochs", type=int, default=2, help="token-lock epochs")
    a("--forged", type=int, default=20)
    a(
        "--flips",
        default="1,2,3,4,6,8,12,16,24,36,72",
        help="tolerance curve: accuracy with tokens that differ in exactly k cells",
    )
    a("--flip-tokens", type=int, default=4, help="tokens per k on the curve")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1)
    return p


def _take(data, n: int):
    return data if n <= 0 or n >= len(data) else data.subset(torch.arange(n))


def main(args: argparse.Namespace) -> dict:
    """Run the comparison; write JSON + PNG; return the result dict."""
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_dataset(args.dataset, root=args.data_root)
    stage = make_stages(bundle, updates=0, seed=args.seed)[0]
    train, val = _take(stage.train, args.train_size), _take(stage.val, args.val_size)
    test, eval_set = bundle.test, _take(bundle.test, args.eval_size)
    torch.manual_seed(args.seed)
    unlocked = build_model(
        "cnn",
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    fit(unlocked, train, TrainConfig(epochs=args.pretrain_epochs, lr=0.05, seed=args.seed))
    rows = {"unlocked_acc": accuracy(unlocked, test), "sizes": {}}
    cfg = TokenLockConfig("single_target", decoy_frac=0.5, near_frac=NEAR_FRAC)
    for n in (int(s) for s in args.sizes.split(",")):
        token = Token.generate("binary", n)  # CSPRNG, as the flows do
        model = copy.deepcopy(unlocked)
        tc = TrainConfig(epochs=args.epochs, lr=0.02, seed=args.seed)
        t1 = time.perf_counter()
        fit_token_lock(model, train, val, token, cfg, tc, num_classes=bundle.num_classes)
        m = token_lock_metrics(model, test, token, forged=0, seed=args.seed)
        f = token_lock_metrics(model, eval_set, token, forged=args.forged, seed=args.seed)
        m.update({k: f[k] for k in f if k.startswith(("forged_", "near_"))})
        m.update(entropy_bits=token.entropy_bits(), lock_seconds=time.perf_counter() - t1)
        m["flip_curve"] = flip_curve(model, eval_set, token, args)
        m["effective_bits"] = effective_bits(n, m["flip_curve"], m["forged_token_acc_max"])
        rows["sizes"][str(n)] = m
        print(json.dumps({"size": n, **m}))
    rows["seconds"] = time.perf_counter() - t0
    (out / "token_size.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "token_size.png")
    return rows


def flipped(token: Token, k: int, g: torch.Generator) -> Token:
    """``token`` with exactly ``k`` of its cells flipped (stamped <-> black)."""
    n = token.size
    bits = torch.tensor(token.pixels)[0] > 0
    cells = torch.randperm(n * n, generator=g)[:k]
    bits.view(-1)[cells] ^= True
    color = float(torch.tensor(token.pixels).max())
    return dataclasses.replace(token, pixels=(color * bits.float())[None].tolist(), seed=None)


def flip_curve(model, data, token: Token, args) -> dict[str, dict]:
    """k -> mean/max accuracy over ``--flip-tokens`` tokens differing in exactly k cells."""
    g = torch.Generator().manual_seed(args.seed + 7)
    out = {}
    for k in (int(x) for x in args.flips.split(",")):
        if k > token.size * token.size:
            continue
        accs = [
            accuracy(model, data, input_fn=stamp_fn(flipped(token, k, g), seed=args.seed))
            for _ in range(args.flip_tokens)
        ]
        out[str(k)] = {"mean": sum(accs) / len(accs), "max": max(accs)}
    return out


def effective_bits(n: int, curve: dict, chance_acc: float) -> float:
    """log2 of the token space divided by the tokens that still unlock.

    A token at Hamming distance <= k unlocks when its max accuracy on the curve is above
    the midpoint between chance and the true token's; the search space shrinks by the
    number of such tokens, sum of C(n*n, i) for i <= k (an upper bound on what unlocks).
    """
    accs = {int(k): v["max"] for k, v in curve.items()}
    ceiling = max(accs.values(), default=chance_acc)
    unlocking = [k for k, a in sorted(accs.items()) if a > (chance_acc + ceiling) / 2]
    k = max(unlocking, default=0)
    cells = n * n
    return cells - math.log2(sum(math.comb(cells, i) for i in range(k + 1)))


def plot(rows: dict, path: Path) -> None:
    """Bars per token size: with token, without, forged max, near-miss max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("with_token_acc", "without_token_acc", "forged_token_acc_max", "near_token_acc_max")
    sizes = list(rows["sizes"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [rows["sizes"][s][name] for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=name)
    ax.axhline(rows["unlocked_acc"], color="k", ls="--", lw=1, label="unlocked")
    ax.set_xticks([j + 0.3 for j in range(len(sizes))])
    labels = [f"{s}x{s} ({rows['sizes'][s]['entropy_bits']:.0f} bits)" for s in sizes]
    ax.set_xticklabels(labels)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.25), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
