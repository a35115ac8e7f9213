"""What is a stolen base worth? Attacks by a party holding the base and N labelled images.

    python bench/attacks.py --dataset fashion-mnist --model cnn --out DIR

Trains the owner's network on the base half of the training set, locks it several ways
(the paper's lock: magnitude rows, zero fill; the library default; hardened variants), and
prices each base against an attacker holding N = 1%, 5%, 10% of the training set (drawn
from the other half). Every attack and the scratch reference get the same hyperparameter
search, chosen on the attacker's validation split. Writes DIR/attacks.json, DIR/attacks.md
and DIR/attacks.png; ``bench/attacks_report.py`` renders the table and figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaloc.attacks import (
    WEIGHT_ATTACKS,
    SearchSpace,
    attacker_split,
    fresh_fn,
    infer_positions,
    position_report,
    scratch,
    shadow_detector,
    weight_attacks,
)
from adaloc.data import load_dataset, make_stages
from adaloc.evaluate import accuracy, chance_level
from adaloc.harden import HardenConfig, balance_fanout, nontransferable
from adaloc.keys import KeySpec, select_key
from adaloc.lock import FILLS, lock, random_key, unlock
from adaloc.models import build_model
from adaloc.training import TrainConfig, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks_report import plot, write_markdown  # noqa: E402
from attacks_token import token_lock_entry  # noqa: E402

DEFAULT_FILL = inspect.signature(lock).parameters["fill"].default
LOCKS = {
    # name: (KeySpec overrides, fill); "default" follows the library's KeySpec() and lock()
    "paper": ({"selection": "magnitude", "include_norm": False, "include_head": False}, "zeros"),
    "default": ({}, DEFAULT_FILL),
    "zeros": ({}, "zeros"),
    "matched": ({}, "matched"),
    "noise": ({}, "noise"),
    "key20": ({"budget": 0.2}, "matched"),
    "key50": ({"budget": 0.5}, "matched"),
    "profile": ({}, "profile"),
    "first": ({"selection": "first"}, DEFAULT_FILL),
    "random_profile": ({"selection": "random"}, "profile"),
    # SOPHON-style non-transferable training of the owner after key selection
    "sophon": ({}, DEFAULT_FILL, "sophon"),
    "sophon_profile": ({}, "profile", "sophon"),
    "probe": ({}, DEFAULT_FILL, "probe"),
    "probe_first": ({"selection": "first"}, DEFAULT_FILL, "probe"),
    # function-preserving fan-out balancing (positions), alone and after the probe training
    "balance": ({}, DEFAULT_FILL, "balance"),
    "balance_profile": ({}, "profile", "balance"),
    "probe_first_balance": ({"selection": "first"}, DEFAULT_FILL, "probe", "balance"),
    "probe_first_balance_profile": ({"selection": "first"}, "profile", "probe", "balance"),
}


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset", default="fashion-mnist", help="fashion-mnist | digits | imagefolder:PATH"
    )
    p.add_argument("--data-root", default="data")
    p.add_argument("--model", default="cnn", choices=("cnn", "mlp", "resnet18"))
    p.add_argument("--out", default="runs/attacks")
    p.add_argument("--fractions", default="0.01,0.05,0.10", help="attacker's share of train")
    p.add_argument("--locks", default="default,paper", help=f"of {','.join(LOCKS)}")
    p.add_argument("--attacks", default=",".join(WEIGHT_ATTACKS))
    p.add_argument("--grid", default="sgd:0.05,adam:0.001", help="optimizer:lr pairs searched")
    p.add_argument("--steps", type=int, default=300, help="step budget per configuration")
    p.add_argument("--checkpoints", type=int, default=5, help="validation checkpoints per run")
    p.add_argument("--owner-epochs", type=int, default=0, help="0 = 2 (>=20k images) or 20")
    p.add_argument("--train-limit", type=int, default=0, help="cap on training images (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="cap on test images (0 = all)")
    p.add_argument("--repeats", type=int, default=1, help="attacker draws averaged per row")
    p.add_argument(
        "--token-size", type=int, default=-1, help="M-LOCK token side; -1 = auto, 0 = off"
    )
    p.add_argument("--token-budget", type=int, default=4096, help="token search tries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--harden-steps", type=int, default=400, help="sophon locks: outer steps")
    p.add_argument("--harden-alpha", type=float, default=1.0, help="sophon: attacker weight")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load(args):
    bundle = load_dataset(args.dataset, args.data_root)
    if args.train_limit and args.train_limit < len(bundle.train):
        bundle.train = bundle.train.subset(torch.arange(args.train_limit))
    if args.test_limit and args.test_limit < len(bundle.test):
        bundle.test = bundle.test.subset(torch.arange(args.test_limit))
    return bundle


def _key_info(spec: KeySpec, fill: str, mask, owner) -> dict:
    total = sum(p.numel() for p in owner.parameters())
    return {
        **{k: v for k, v in spec.to_dict().items() if k != "format_version"},
        "fill": fill,
        "params_in_key": mask.params_in_key(owner),
        "params_total": total,
    }


def _positions_by_fill(owner, spec, mask, shadow, data, make, harden=None) -> dict:
    """Position inference against the true mask for every fill (shadows hardened alike)."""
    out = {}
    for fill in FILLS:
        base, _ = lock(owner, mask, fill=fill)
        det = shadow_detector([shadow], base, spec, fill, data, make, harden=harden)
        out[fill] = position_report(owner, spec, infer_positions(base, spec, det), mask).to_dict()
    return out


def main(args: argparse.Namespace) -> dict:
    """Run the recipe; write attacks.json / .md / .png; return the JSON dict."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    bundle = _load(args)
    stages = make_stages(bundle, updates=1, seed=args.seed, val_fraction=0.0)
    owner_train, pool, test = stages[0].train, stages[1].train, bundle.test
    make = functools.partial(
        build_model,
        args.model,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    epochs = args.owner_epochs or (2 if len(owner_train) >= 20_000 else 20)
    torch.manual_seed(args.seed)
    owner = make()
    fit(
        owner,
        owner_train,
        TrainConfig(epochs=epochs, lr=0.05, seed=args.seed, device="cpu"),
        desc="owner",
        progress=progress,
    )
    grid = tuple((o, float(lr)) for o, lr in (g.split(":") for g in args.grid.split(",")))
    space = SearchSpace(grid=grid, steps=args.steps, checkpoints=args.checkpoints, seed=args.seed)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    attacks = tuple(a for a in args.attacks.split(",") if a)
    lock_names = [n for n in args.locks.split(",") if n]
    unknown = [n for n in lock_names if n not in LOCKS]
    if unknown:
        raise SystemExit(f"unknown lock(s) {unknown}; expected names from {list(LOCKS)}")
    n_train = len(bundle.train)
    result = {
        "dataset": args.dataset,
        "model": args.model,
        "chance": chance_level(bundle.num_classes),
        "n_train": n_train,
        "n_test": len(test),
        "owner_train": len(owner_train),
        "owner_epochs": epochs,
        "search": space.to_dict(),
        "repeats": args.repeats,
        "locks": {},
        "default_lock": "default",
    }
    jobs = len(fractions) * args.repeats * (1 + len(lock_names) * len(attacks))
    bar = tqdm(total=jobs, desc="attacks", disable=not progress, unit="search")
    locks, refs = {}, {}
    owners, hardens = {}, {}
    for name in lock_names:
        over, fill, *hardening = LOCKS[name]
        spec = KeySpec(**over)
        mask = select_key(owner, spec, data=owner_train)
        t_h = time.perf_counter()
        cfg = HardenConfig(steps=args.harden_steps, alpha=args.harden_alpha, seed=args.seed)
        hardens[name] = functools.partial(_harden, tuple(hardening), cfg, make)
        model = hardens[name](owner, mask, owner_train) if hardening else owner
        owners[name] = model
        base, key = lock(model, mask, fill=fill, seed=args.seed)
        locks[name] = (spec, fill, mask, base)
        result["locks"][name] = {
            "hardening": {
                **{k: v for k, v in cfg.__dict__.items() if k != "objective"},
                "steps": list(hardening),
                "seconds": round(time.perf_counter() - t_h, 1),
            }
            if hardening
            else None,
            "unhardened_owner_acc": accuracy(owner, test),
            "owner_acc": accuracy(unlock(base, key), test),
            "unauthorized_acc": accuracy(base, test),
            "random_key_acc": accuracy(unlock(base, random_key(key, seed=args.seed)), test),
            "key": _key_info(spec, fill, mask, owner),
            "rows": [],
        }
    for frac in fractions:
        n = max(2, round(frac * n_train))
        acc_rows: dict = {}
        for rep in range(args.repeats):
            data = attacker_split(pool, n, seed=args.seed + 1000 * rep + 1)
            ref = scratch(fresh_fn(make, args.seed + 7), data, space)
            bar.update(1)
            scratch_acc = accuracy(ref.model, test)
            if rep == 0:
                refs[frac] = (data, scratch_acc)
            for name, (spec, fill, mask, base) in locks.items():
                det = shadow_detector(
                    [ref.model],
                    base,
                    spec,
                    fill,
                    data,
                    fresh_fn(make, 11),
                    harden=hardens[name] if LOCKS[name][2:] else None,
                )
                got = weight_attacks(
                    base,
                    spec,
                    fresh_fn(make, args.seed + 7),
                    data,
                    space,
                    detector=det,
                    attacks=attacks,
                )
                bar.update(len(attacks))
                for attack, res in got.items():
                    pos = (
                        position_report(owner, spec, res.positions, mask) if res.positions else None
                    )
                    acc_rows.setdefault((name, attack), []).append(
                        (accuracy(res.model, test), scratch_acc, res.val_acc, pos, res.search)
                    )
                if rep == 0 and frac == fractions[0]:
                    result["locks"][name]["positions_by_fill"] = _positions_by_fill(
                        owners[name],
                        spec,
                        mask,
                        ref.model,
                        data,
                        fresh_fn(make, 11),
                        harden=hardens[name] if LOCKS[name][2:] else None,
                    )
        for name in locks:
            rows = result["locks"][name]["rows"]
            per_attack = {a: v for (lk, a), v in acc_rows.items() if lk == name}
            for attack, vals in per_attack.items():
                rows.append(_row(attack, frac, n, vals))
            # the attacker's own pick: the attack with the best validation accuracy
            best = max(per_attack, key=lambda a: sum(v[2] for v in per_attack[a]))
            rows.append({**_row(best, frac, n, per_attack[best]), "attack": "best", "picked": best})
        # a long run keeps what it has measured so far (re-draw with bench/attacks_report.py)
        (out / "attacks.json").write_text(json.dumps(result, indent=2))
    bar.close()
    if args.token_size != 0:
        entry = token_lock_entry(args, bundle, owner_train, test, make, space, refs, progress)
        if entry is not None:
            result["locks"]["tokenlock"] = entry
    result["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "attacks.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "attacks.md")
    plot(result, out / "attacks.png")
    print((out / "attacks.md").read_text())
    return result


def _harden(steps: tuple, cfg: HardenConfig, make, model, mask, train):
    """The lock's hardening steps in order (also what the attacker applies to shadows)."""
    for step in steps:
        if step in ("sophon", "probe"):
            objective = "probe" if step == "probe" else "finetune"
            c = dataclasses.replace(cfg, objective=objective)
            model = nontransferable(model, mask, train, fresh_fn(make, cfg.seed + 99), c)
        elif step == "balance":
            model = balance_fanout(model, mask)
    return model


def _row(attack: str, frac: float, n: int, vals: list) -> dict:
    k = len(vals)
    att = sum(v[0] for v in vals) / k
    scr = sum(v[1] for v in vals) / k
    pos = [v[3] for v in vals if v[3] is not None]
    last = vals[-1][4]
    return {
        "attack": attack,
        "fraction": frac,
        "n": n,
        "attacked_acc": att,
        "scratch_acc": scr,
        "leak_pt": 100 * (att - scr),
        "positions_precision": sum(p.precision for p in pos) / len(pos) if pos else None,
        "positions_recall": sum(p.recall for p in pos) / len(pos) if pos else None,
        "positions_share": pos[0].share if pos else None,
        "val_acc": sum(v[2] for v in vals) / k,
        "chosen": {"optimizer": last.optimizer, "lr": last.lr, "steps": last.steps},
    }


if __name__ == "__main__":
    main(get_args_parser().parse_args())
