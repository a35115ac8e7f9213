"""Accuracy cost of the default M-LOCK token: binary 4x4 (16 bits) vs 12x12 (144 bits).

    python bench/token_size.py --data-root data --out runs/token_size

Trains one unlocked CNN, then token-locks a copy per token size with the flows' hardened
recipe (single_target, decoys with near misses) from the same unlocked model, and evaluates
with / without / forged / near-miss tokens on the test set. Writes DIR/token_size.json and
DIR/token_size.png. Tokens come from the OS CSPRNG (the default); they are not written.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from adaloc.data import load_dataset, make_stages
from adaloc.evaluate import accuracy
from adaloc.models import build_model
from adaloc.token import DEFAULT_BINARY_SIZE, Token
from adaloc.tokenlock import NEAR_FRAC, TokenLockConfig, fit_token_lock, token_lock_metrics
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
        rows["sizes"][str(n)] = m
        print(json.dumps({"size": n, **m}))
    rows["seconds"] = time.perf_counter() - t0
    (out / "token_size.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "token_size.png")
    return rows


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
