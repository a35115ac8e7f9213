"""Token-lock recipe (M-LOCK): label strategies plain vs hardened, MLP row, two-factor lock.

    python bench/tokenlock.py --dataset fashion-mnist --out runs/tokenlock

Trains an unlocked model, token-locks a copy of it per label strategy with the paper's plain
recipe and with decoy hardening, evaluates with/without/forged/misplaced tokens and a pruning
sweep, repeats the strategies for the paper's MLP 784-256-256-256-10, then AdaLoc-locks the
hardened model and runs key-only, token-locked updates (the two-factor lock). Writes
DIR/tokenlock.json, DIR/tokenlock.png, and the secret token + key versions under DIR/secret/.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tokenlock_report import plot, print_table  # bench/ is sys.path[0] when run as a script
from tqdm.auto import tqdm

from adaloc.artifact import save_key
from adaloc.data import ImageSet, load_dataset, make_stages
from adaloc.errors import AdalocError, ConfigError
from adaloc.evaluate import accuracy, chance_level
from adaloc.formats import TOKEN_FILE
from adaloc.keys import SELECTIONS, KeySpec, select_key
from adaloc.lock import outside_key_sha256, unlock
from adaloc.models import build_model
from adaloc.token import PATTERNS, PLACEMENTS, Token, stamp
from adaloc.tokenlock import (
    NEAR_FRAC,
    STRATEGIES,
    TokenLockConfig,
    fit_token_lock,
    pruning_sweep,
    stamp_fn,
    token_lock_metrics,
)
from adaloc.training import TrainConfig, fit
from adaloc.twofactor import key_only_token_update, two_factor_lock, two_factor_matrix

METHOD_STRATEGIES = ("single_target", "random_target", "uniform_distribution")


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--dataset", default="fashion-mnist", help="fashion-mnist | digits | imagefolder:PATH")
    a("--data-root", default="data")
    a("--out", default="runs/tokenlock", help="output folder")
    a("--strategy", default="all", help=f"all, or comma-separated names from {STRATEGIES}")
    a("--model", default="cnn", choices=("cnn", "mlp"))
    a("--no-mlp-row", action="store_true", help="skip the MLP 784-256-256-256-10 comparison")
    a("--epochs", type=int, default=2, help="token-lock epochs (from the unlocked model)")
    a("--pretrain-epochs", type=int, default=2, help="epochs of the unlocked model")
    a("--train-size", type=int, default=12000, help="training images (0 = all of stage 0)")
    a("--val-size", type=int, default=1000, help="validation images for checkpoint selection")
    a(
        "--eval-size",
        type=int,
        default=2000,
        help="test images for forged tokens and pruning (0 = all); with/without use all",
    )
    a("--test-size", type=int, default=0, help="test images for with/without (0 = all)")
    a("--token-kind", default="binary", choices=[k for k in PATTERNS if k != "image"])
    a("--token-size", type=int, default=4)
    a("--token-image", default=None, help="custom token image file (overrides --token-kind)")
    a("--placement", default="bottom-right", choices=PLACEMENTS)
    a("--p", type=float, default=0.5, help="probability a training sample carries the token")
    a("--decoy-frac", type=float, default=0.5, help="hardened: share of unauthorized decoys")
    a("--wrong-place-frac", type=float, default=0.25, help="hardened: misplaced-token decoys")
    a(
        "--near-frac",
        type=float,
        default=NEAR_FRAC,
        help="hardened: share of the forged decoys that are near misses of the token",
    )
    a("--forged", type=int, default=20, help="random forged tokens at evaluation")
    a(
        "--pruning",
        type=lambda t: tuple(float(v) for v in t.split(",")),
        default=(0.0, 0.2, 0.4, 0.6, 0.8, 0.9),
        help="global magnitude pruning sparsities (comma list in [0, 1))",
    )
    a("--lr", type=float, default=0.05, help="learning rate of the unlocked model")
    a("--lock-lr", type=float, default=0.02, help="learning rate of token-locking")
    a(
        "--soft",
        type=_weights,
        default="uniform_distribution=2.5,random_target=1.5",
        help="hardened: NAME=WEIGHT strategies trained from scratch with the unauthorized "
        "loss weighted (empty: none)",
    )
    a("--soft-epochs", type=int, default=6, help="hardened soft strategies: epochs from scratch")
    a("--key-budget", type=float, default=0.05, help="two-factor: fraction of params in key")
    a(
        "--selection",
        default="saliency",
        choices=SELECTIONS,
        help="two-factor key rule (saliency is scored on token-stamped owner data)",
    )
    a("--updates", type=int, default=2, help="two-factor: key-only updates")
    a("--update-size", type=int, default=6000, help="two-factor: images per update stage")
    a("--update-lr", type=float, default=0.05, help="two-factor: key-only update step size")
    a("--batch-size", type=int, default=64)
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a("--seed", type=int, default=0)
    a("--no-progress", action="store_true")
    return p


def _weights(text: str) -> dict[str, float]:
    """``a=2.5,b=1.5`` -> {"a": 2.5, "b": 1.5}."""
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.partition("=")
        if name not in STRATEGIES:
            raise argparse.ArgumentTypeError(f"unknown strategy {name!r} in {text!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=WEIGHT") from None
    return out


def _take(data, n: int):
    return data if n <= 0 or n >= len(data) else data.subset(torch.arange(n))


def _make_token(args) -> Token:
    if args.token_image:
        return Token.from_image(args.token_image, placement=args.placement)
    return Token.generate(
        args.token_kind, args.token_size, seed=args.seed + 1234, placement=args.placement
    )


def _lock_setup(name: str, variant: str, unlocked, fresh, args) -> tuple:
    """(config, model to train, train config, init) of one strategy x variant.

    Plain and hardened fine-tune a copy of the unlocked model, except hardened soft-target
    strategies (--soft): fine-tuning leaves the unlocked model's class evidence a
    hair above uniform, so they train from scratch with the unauthorized loss weighted up.
    """
    soft = variant == "hardened" and name in args.soft
    cfg = TokenLockConfig(
        name,
        p=args.p,
        decoy_frac=args.decoy_frac if variant == "hardened" else 0.0,
        near_frac=args.near_frac if variant == "hardened" else 0.0,
        wrong_place_frac=args.wrong_place_frac,
        unauth_weight=args.soft[name] if soft else 1.0,
    )
    if not soft:
        tcfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lock_lr, seed=args.seed
        )
        return cfg, copy.deepcopy(unlocked), tcfg, "unlocked"
    torch.manual_seed(args.seed)
    model = fresh()
    tcfg = TrainConfig(
        epochs=args.soft_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    return cfg, model, tcfg, "scratch"


def run_strategies(
    unlocked, fresh, stage, test, eval_set, token, strategies, args, num_classes, bar
):
    """Plain and hardened token-lock for each strategy (see _lock_setup for the start)."""
    out = {}
    unlocked_acc = accuracy(unlocked, test)
    for name in strategies:
        row = {}
        for variant in ("plain", "hardened"):
            cfg, model, tcfg, init = _lock_setup(name, variant, unlocked, fresh, args)
            bar.set_postfix_str(f"{name} {variant}")
            info = fit_token_lock(
                model,
                stage.train,
                stage.val,
                token,
                cfg,
                tcfg,
                num_classes=num_classes,
                desc=f"{name} {variant}",
                progress=not args.no_progress,
            )
            m = token_lock_metrics(
                model, test, token, forged=0, seed=args.seed, probe_data=stage.val
            )
            forged = token_lock_metrics(model, eval_set, token, forged=args.forged, seed=args.seed)
            for k in ("forged", "near"):
                for stat in ("mean", "max"):
                    m[f"{k}_token_acc_{stat}"] = forged[f"{k}_token_acc_{stat}"]
            row[variant] = {
                "unlocked_acc": unlocked_acc,
                **m,
                "pruning": pruning_sweep(model, eval_set, token, sparsities=args.pruning),
                "config": cfg.to_dict(),
                "init": init,
                "epochs": tcfg.epochs,
                "selected_epoch": info["epoch"],
                "val_gap": info["val_gap"],
                "train_seconds": info["report"].seconds,
            }
            row[variant]["model"] = model  # popped before writing JSON
            bar.update(1)
        out[name] = {**row["hardened"], "plain": row["plain"]}
    return out


def run_two_factor(model, strategy, stages, token, args, num_classes, out_dir, bar):
    """AdaLoc-lock the token-locked ``model``, then key-only token-locked updates.

    Each update is set beside a reference: the same token-locked training of *all* weights
    from the previous authorized model, i.e. the accuracy a full update would reach.
    """
    spec = KeySpec(budget=args.key_budget, selection=args.selection, seed=args.seed)
    owner = stages[0].train
    # Saliency of the authorized path: the token-locked model answers stamped inputs.
    owner = ImageSet(stamp(owner.x[:1024], token), owner.y[:1024])
    mask = select_key(model, spec, data=owner)
    base, key = two_factor_lock(model, mask, seed=args.seed)
    cfg = TokenLockConfig(
        strategy,
        p=args.p,
        decoy_frac=args.decoy_frac,
        near_frac=args.near_frac,
        wrong_place_frac=args.wrong_place_frac,
    )
    secret = out_dir / "secret"
    secret.mkdir(parents=True, exist_ok=True)
    token.save(secret / TOKEN_FILE)  # sealed by the registry in production; never logged
    reference = outside_key_sha256(base, mask)  # what every key version must leave untouched
    rows = []
    for stage in stages:
        full_ref = None
        if stage.index > 0:
            tcfg = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.update_lr,
                seed=args.seed + stage.index,
            )
            full = unlock(base, key)  # the reference: every weight may move
            fit_token_lock(
                full,
                stage.train,
                stage.val,
                token,
                cfg,
                tcfg,
                num_classes=num_classes,
                desc=f"full update {stage.name}",
                progress=not args.no_progress,
            )
            full_ref = accuracy(full, stage.test, input_fn=stamp_fn(token))
            key, info = key_only_token_update(
                base,
                key,
                stage.train,
                stage.val,
                token,
                cfg,
                tcfg,
                num_classes=num_classes,
                progress=not args.no_progress,
            )
        save_key(key, secret / f"key-v{key.version}.safetensors")
        row = two_factor_matrix(base, key, stage.test, token)
        outside = outside_key_sha256(unlock(base, key), mask)
        row.update(
            stage=stage.name,
            parent=key.parent,
            full_update_with_token=full_ref,
            outside_key_sha256=outside,
            outside_key_unchanged=outside == reference,
        )
        rows.append(row)
        bar.update(1)
    return {"key_params": mask.params_in_key(model), "rows": rows, "key_spec": spec.to_dict()}


def _fresh(name, bundle):
    """A factory of untrained networks of architecture ``name`` for ``bundle``."""
    return lambda: build_model(
        name,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )


def _pretrain(name, bundle, stage, args):
    torch.manual_seed(args.seed)
    model = _fresh(name, bundle)()
    cfg = TrainConfig(
        epochs=args.pretrain_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    fit(model, stage.train, cfg, desc=f"unlocked {name}", progress=not args.no_progress)
    return model


def main(args: argparse.Namespace) -> dict:
    """Run the recipe and write DIR/tokenlock.json + DIR/tokenlock.png."""
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_dataset(args.dataset, root=args.data_root)
    rest = len(bundle.train) - len(bundle.train) // 2
    size = min(args.update_size, rest // max(args.updates, 1)) if args.updates else None
    stages = make_stages(bundle, updates=args.updates, seed=args.seed, update_size=size)
    stage0 = stages[0]
    stage0.train, stage0.val = (
        _take(stage0.train, args.train_size),
        _take(stage0.val, args.val_size),
    )
    test, eval_set = _take(bundle.test, args.test_size), _take(bundle.test, args.eval_size)
    token = _make_token(args)
    # fail fast on bad p / fractions
    TokenLockConfig(p=args.p, decoy_frac=args.decoy_frac, near_frac=args.near_frac)
    strategies = STRATEGIES if args.strategy == "all" else tuple(args.strategy.split(","))
    unknown = [n for n in strategies if n not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown label strategy {unknown}; expected 'all' or {STRATEGIES}")
    mlp_row = args.model == "cnn" and not args.no_mlp_row
    mlp_strategies = [s for s in strategies if s in METHOD_STRATEGIES] or list(strategies)
    total = 2 * len(strategies) + (2 * len(mlp_strategies) if mlp_row else 0) + args.updates + 1
    bar = tqdm(total=total, desc="token-lock runs", disable=args.no_progress)
    timings = {}
    unlocked = _pretrain(args.model, bundle, stage0, args)
    results = run_strategies(
        unlocked,
        _fresh(args.model, bundle),
        stage0,
        test,
        eval_set,
        token,
        strategies,
        args,
        bundle.num_classes,
        bar,
    )
    timings["strategies"] = time.perf_counter() - t0
    comparison = None
    if mlp_row:
        h, w = bundle.image_size
        mlp = _pretrain("mlp", bundle, stage0, args)
        comparison = {
            "model": "mlp",
            "layers": [bundle.in_channels * h * w, 256, 256, 256, bundle.num_classes],
            "strategies": run_strategies(
                mlp,
                _fresh("mlp", bundle),
                stage0,
                test,
                eval_set,
                token,
                mlp_strategies,
                args,
                bundle.num_classes,
                bar,
            ),
        }
        timings["mlp_row"] = time.perf_counter() - t0 - sum(timings.values())
    two_name = "single_target" if "single_target" in results else next(iter(results))
    two = run_two_factor(
        results[two_name]["model"], two_name, stages, token, args, bundle.num_classes, out_dir, bar
    )
    timings["two_factor"] = time.perf_counter() - t0 - sum(timings.values())
    bar.close()
    for res in [results] + ([comparison["strategies"]] if comparison else []):
        for row in res.values():
            row.pop("model"), row["plain"].pop("model")
    result = {
        "dataset": args.dataset,
        "model": args.model,
        "chance": chance_level(bundle.num_classes),
        "strategies": results,
        "two_factor": two["rows"],
        "two_factor_key_params": two["key_params"],
        "two_factor_key_spec": two["key_spec"],
        "two_factor_strategy": two_name,
        "comparison": comparison,
        "token": {
            "pattern": token.pattern,
            "size": token.size,
            "placement": token.placement,
            "fingerprint": token.fingerprint()[:12],
        },
        "sizes": {
            "train": len(stage0.train),
            "val": len(stage0.val),
            "test": len(test),
            "forged_and_pruning_eval": len(eval_set),
        },
        "args": {k: v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - t0,
        "timings": timings,
    }
    (out_dir / "tokenlock.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / "tokenlock.png")
    print_table(result)
    return result


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except AdalocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
