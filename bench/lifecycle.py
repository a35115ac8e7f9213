"""Lifecycle recipe: train a base, lock it, run K key-only updates next to full fine-tuning.

    python bench/lifecycle.py --dataset fashion-mnist --model cnn --updates 3 --epochs 2 \
        --key-budget 0.05 --out runs/lifecycle

Writes DIR/lifecycle.json and DIR/lifecycle.png. ``--rules magnitude,saliency,random`` also
runs the same updates for other selection rules (same base, same data) and reports them
side by side under "rules".

Every update, key-only and the full fine-tuning reference alike, runs
:func:`adaloc.adapt.adapt`: BatchNorm statistics re-estimated on the stage, then a step budget
chosen on the stage's validation split (the recipe's defaults, :class:`UpdateRecipe`, are the
pipelines' too). ``--update-fraction 0.1`` keeps 10% of each update stage's training images.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from adaloc.adapt import UpdateRecipe, adapt
from adaloc.artifact import encode_base, encode_key
from adaloc.data import load_dataset, make_stages
from adaloc.evaluate import accuracy, chance_level
from adaloc.harden import HardenConfig, hide_fanout, nontransferable
from adaloc.keys import SELECTIONS, KeySpec, select_key
from adaloc.lock import (
    extract_key,
    lock,
    outside_key_sha256,
    random_key,
    state_sha256,
    unlock,
)
from adaloc.models import MODEL_NAMES, build_model
from adaloc.training import TrainConfig, fit


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="fashion-mnist | digits | cifar100 | flowers102 | caltech256 | imagefolder:PATH",
    )
    p.add_argument("--data-root", default="data", help="root folder of the datasets")
    p.add_argument("--model", default="cnn", choices=MODEL_NAMES)
    p.add_argument("--updates", type=int, default=3, help="number of key-only updates K")
    p.add_argument("--epochs", type=int, default=2, help="epochs per stage")
    p.add_argument(
        "--key-budget", type=float, default=0.05, help="fraction of parameters in the key"
    )
    p.add_argument("--selection", default="saliency", choices=SELECTIONS)
    p.add_argument("--granularity", default="row", choices=("row", "element"))
    p.add_argument("--bn-stats", default="key", choices=("key", "freeze"))
    p.add_argument(
        "--no-norm-in-key", action="store_true", help="leave normalization layers out of the key"
    )
    p.add_argument(
        "--stem-in-key",
        default="default",
        choices=("default", "yes", "no"),
        help="put the input stem conv in the key (default: KeySpec's default)",
    )
    p.add_argument("--no-head-in-key", action="store_true", help="leave the head out of the key")
    p.add_argument(
        "--shifts",
        default="invert,rotate,contrast",
        help="domain shifts for updates 2.. (comma-separated)",
    )
    p.add_argument(
        "--rules", default="", help="also compare these selection rules, e.g. magnitude,random"
    )
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of base training")
    rec = UpdateRecipe()
    p.add_argument(
        "--update-lr", type=float, default=rec.lr, help="learning rate of key-only updates"
    )
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw", "adam"))
    p.add_argument("--update-optimizer", default=rec.optimizer, choices=("sgd", "adamw", "adam"))
    p.add_argument("--min-steps", type=int, default=rec.min_steps, help="update step budget floor")
    p.add_argument("--max-epochs", type=int, default=rec.max_epochs, help="update epoch cap")
    p.add_argument(
        "--patience-steps",
        type=int,
        default=rec.patience_steps,
        help="update steps without val gain before stopping",
    )
    p.add_argument(
        "--start-margin",
        type=float,
        default=rec.start_margin,
        help="val gain (in standard errors) an update needs to leave its start",
    )
    p.add_argument(
        "--no-bn-recalibration",
        action="store_true",
        help="do not re-estimate BatchNorm statistics on each update stage",
    )
    p.add_argument(
        "--no-polarity-candidate",
        action="store_true",
        help="do not score the first-BatchNorm-negated start on val",
    )
    p.add_argument(
        "--update-fraction",
        type=float,
        default=1.0,
        help="share of each update stage's training images to use (e.g. 0.1)",
    )
    p.add_argument(
        "--train-limit", type=int, default=0, help="use only the first N training images (0 = all)"
    )
    p.add_argument(
        "--test-limit", type=int, default=0, help="use only the first N test images (0 = all)"
    )
    p.add_argument(
        "--no-speed", action="store_true", help="skip the side-by-side samples/s measurement"
    )
    p.add_argument(
        "--harden",
        default="none",
        choices=("none", "probe"),
        help="adaloc.harden training of the base after key selection (issue 14)",
    )
    p.add_argument("--harden-alpha", type=float, default=HardenConfig.alpha)
    p.add_argument(
        "--hide-fanout",
        action="store_true",
        help="adaloc.harden.hide_fanout after the hardening (keyed units get public fan-outs)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/lifecycle", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def _spec(args, selection: str) -> KeySpec:
    stem = {"yes": {"include_stem": True}, "no": {"include_stem": False}}.get(args.stem_in_key, {})
    return KeySpec(
        **stem,
        budget=args.key_budget,
        selection=selection,
        granularity=args.granularity,
        seed=args.seed,
        include_norm=not args.no_norm_in_key,
        include_head=not args.no_head_in_key,
        bn_stats=args.bn_stats,
    )


def _recipe(args) -> UpdateRecipe:
    return UpdateRecipe(
        optimizer=args.update_optimizer,
        lr=args.update_lr,
        min_steps=args.min_steps,
        max_epochs=args.max_epochs,
        patience_steps=args.patience_steps,
        start_margin=args.start_margin,
        recalibrate_bn=not args.no_bn_recalibration,
        polarity_candidate=not args.no_polarity_candidate,
    )


def run_chain(
    model,
    spec,
    stages,
    recipe,
    full_cfg,
    *,
    epochs,
    seed=0,
    progress=True,
    with_full=True,
    harden=None,
    hide=False,
) -> dict:
    """Lock ``model`` with ``spec`` and run every update stage key-only (and fully, to compare).

    ``harden``: a HardenConfig; the model is trained non-transferable after key selection.
    ``hide``: then :func:`adaloc.harden.hide_fanout` (function kept, the key's rows rescaled).
    """
    mask = select_key(model, spec, data=stages[0].train)
    if harden is not None:
        fresh = copy.deepcopy(model)
        make = lambda: _reinit(fresh)  # noqa: E731
        model = nontransferable(model, mask, stages[0].train, make, harden)
    if hide:
        model = hide_fanout(model, mask, seed=seed)
    base, key = lock(model, mask)
    base_bytes = len(encode_base(base))
    outside = outside_key_sha256(base, mask)
    total = sum(p.numel() for p in model.parameters())
    versions = []
    owner, full = model, copy.deepcopy(model)
    for stage in stages:
        update = full_update = None
        if stage.index > 0:
            owner = unlock(base, key)
            kw = {"epochs": epochs, "seed": seed + stage.index, "progress": progress}
            update = adapt(
                owner, stage.train, stage.val, mask=mask, recipe=recipe, desc="key-only", **kw
            ).to_dict()
            key = extract_key(
                owner,
                mask,
                base_sha256=key.base_sha256,
                version=stage.index + 1,
                parent=stage.index,
            )
            if with_full:
                full_update = adapt(
                    full,
                    stage.train,
                    stage.val,
                    mask=None,
                    recipe=recipe,
                    cfg=full_cfg,
                    desc="full FT",
                    **kw,
                ).to_dict()
        authorized = unlock(base, key)
        versions.append(
            {
                "version": key.version,
                "stage": stage.name,
                "shifted": stage.shifted,
                "shift": stage.shift,
                "train_images": len(stage.train),
                "val_images": len(stage.val),
                "authorized_acc": accuracy(authorized, stage.test),
                "unauthorized_acc": accuracy(base, stage.test),
                **_random_key_accs(base, key, stage),
                "full_finetune_acc": accuracy(full, stage.test) if with_full else None,
                "key_bytes": len(encode_key(key)),
                "base_bytes": base_bytes,
                "outside_key_sha256": outside_key_sha256(authorized, mask),
                "seconds": round(update["seconds"], 2) if update else 0.0,
                "update": update,
                "full_update": full_update,
            }
        )
        assert versions[-1]["outside_key_sha256"] == outside, "key-only update left the key"
    return {
        "mask": mask,
        "base": base,
        "key": key,
        "params_in_key": mask.params_in_key(model),
        "params_total": total,
        "versions": versions,
    }


RANDOM_KEYS = 5


def _reinit(model):
    """A fresh initialisation of ``model``'s architecture (every layer's reset_parameters)."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return out


def _random_key_accs(base, key, stage) -> dict:
    """Base + random key (true per-tensor mean/std): mean and max over RANDOM_KEYS draws.

    One draw's accuracy is a random linear read-out's luck (it spreads by several points
    around chance); the mean estimates what an attacker gets, the max shows the spread.
    """
    accs = [
        accuracy(unlock(base, random_key(key, seed=100 * stage.index + k)), stage.test)
        for k in range(RANDOM_KEYS)
    ]
    return {"random_key_acc": sum(accs) / len(accs), "random_key_max": max(accs)}


def measure_speed(
    model, mask, data, recipe, full_cfg, *, repeats: int = 2, limit: int = 4096
) -> dict:
    """Samples/s of one key-only epoch and one full fine-tuning epoch, side by side.

    Alternates the two ``repeats`` times on copies of the same model and the same images
    (the first ``limit`` of ``data``); the best of each counts: the machine is shared, and
    the fastest run is the least disturbed one. Also reported: the median of the per-pair
    ratios, and the ratio of the CPU time this process spent (less sensitive to other jobs
    taking turns on the cores than wall time).
    """
    data = data.subset(torch.arange(min(limit, len(data))))
    key_cfg = recipe.train_config(epochs=1, seed=0, device=full_cfg.device)
    full_cfg = dataclasses.replace(full_cfg, epochs=1, batch_size=recipe.batch_size)
    wall = {"key_only": [], "full": []}
    cpu = {"key_only": [], "full": []}
    for _ in range(repeats):
        for name, cfg, m in (("key_only", key_cfg, mask), ("full", full_cfg, None)):
            c0 = time.process_time()
            rep = fit(copy.deepcopy(model), data, cfg, mask=m, progress=False)
            cpu[name].append(len(data) / (time.process_time() - c0))
            wall[name].append(len(data) / rep.seconds)
    pairs = sorted(k / f for k, f in zip(wall["key_only"], wall["full"], strict=True))
    return {
        "images": len(data),
        "key_only_samples_per_s": round(max(wall["key_only"]), 1),
        "full_samples_per_s": round(max(wall["full"]), 1),
        "ratio": round(max(wall["key_only"]) / max(wall["full"]), 3),
        "median_pair_ratio": round(pairs[len(pairs) // 2], 3),
        "cpu_ratio": round(max(cpu["key_only"]) / max(cpu["full"]), 3),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }


def plot(result: dict, path: Path) -> None:
    """Authorized / unauthorized / random-key / full fine-tune accuracy per version (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = result["versions"]
    x = [f"v{v['version']}\n{v['stage']}" for v in vs]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(vs), 4))
    series = [
        ("authorized_acc", "authorized (base + key)", "o-"),
        ("full_finetune_acc", "full fine-tuning", "s--"),
        ("random_key_acc", "base + random key", "^:"),
        ("unauthorized_acc", "unauthorized (base alone)", "x-"),
    ]
    for field, label, style in series:
        ax.plot(x, [100 * v[field] for v in vs], style, label=label)
    ax.axhline(100 * result["chance"], color="grey", lw=0.8, ls="--", label="chance")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"{result['dataset']} / {result['model']}: key "
        f"{100 * result['key']['params_in_key'] / result['key']['params_total']:.1f}% "
        "of parameters"
    )
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    """Run the recipe and write lifecycle.json + lifecycle.png; returns the JSON dict."""
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    torch.manual_seed(args.seed)
    bundle = load_dataset(args.dataset, args.data_root)
    if args.train_limit:
        bundle.train = bundle.train.subset(torch.arange(min(args.train_limit, len(bundle.train))))
    if args.test_limit:
        bundle.test = bundle.test.subset(torch.arange(min(args.test_limit, len(bundle.test))))
    shifts = tuple(s for s in args.shifts.split(",") if s)
    stages = make_stages(
        bundle,
        updates=args.updates,
        seed=args.seed,
        shifts=shifts,
        update_fraction=args.update_fraction,
    )
    model = build_model(
        args.model,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    base_cfg = TrainConfig(
        epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, seed=args.seed, device=args.device
    )
    fit(model, stages[0].train, base_cfg, progress=progress, desc="train base")
    model.to("cpu")
    recipe = _recipe(args)
    spec = _spec(args, args.selection)
    chain_kw = {"epochs": args.epochs, "seed": args.seed, "progress": progress}
    harden = None
    if args.harden != "none":
        harden = HardenConfig(objective=args.harden, alpha=args.harden_alpha, seed=args.seed)
    chain = run_chain(
        model, spec, stages, recipe, base_cfg, harden=harden, hide=args.hide_fanout, **chain_kw
    )
    result = {
        "dataset": args.dataset,
        "model": args.model,
        "num_classes": bundle.num_classes,
        "chance": chance_level(bundle.num_classes),
        "key": {
            "budget": spec.budget,
            "selection": spec.selection,
            "granularity": spec.granularity,
            "include_norm": spec.include_norm,
            "include_head": spec.include_head,
            "bn_stats": spec.bn_stats,
            "include_stem": spec.include_stem,
            "harden": None if harden is None else harden.__dict__,
            "hide_fanout": args.hide_fanout,
            "params_in_key": chain["params_in_key"],
            "params_total": chain["params_total"],
        },
        "base_sha256": state_sha256(chain["base"]),
        "recipe": recipe.to_dict(),
        "update_fraction": args.update_fraction,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "versions": chain["versions"],
    }
    if not args.no_speed and len(stages) > 1:
        result["speed"] = measure_speed(model, chain["mask"], stages[1].train, recipe, base_cfg)
    rules = [r for r in args.rules.split(",") if r and r != args.selection]
    if rules:
        result["rules"] = {args.selection: _rule_row(chain)}
        for rule in rules:
            other = run_chain(
                model, _spec(args, rule), stages, recipe, base_cfg, with_full=False, **chain_kw
            )
            result["rules"][rule] = _rule_row(other)
    result["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "lifecycle.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "lifecycle.png")
    _print_table(result)
    return result


def _rule_row(chain: dict) -> dict:
    return {
        "params_in_key": chain["params_in_key"],
        "versions": [
            {
                k: v[k]
                for k in (
                    "version",
                    "stage",
                    "authorized_acc",
                    "unauthorized_acc",
                    "random_key_acc",
                )
            }
            for v in chain["versions"]
        ],
    }


def _print_table(result: dict) -> None:
    print(
        f"\n{result['dataset']} / {result['model']}  chance {100 * result['chance']:.1f}%  "
        f"key {result['key']['params_in_key']}/{result['key']['params_total']} params"
    )
    print(
        f"{'ver':>3} {'stage':<18} {'n':>5} {'auth':>6} {'full':>6} {'gap':>6} {'unauth':>6} "
        f"{'randkey':>7} {'steps':>5} {'key B':>8} {'base B':>8}"
    )
    for v in result["versions"]:
        full = v["full_finetune_acc"]
        steps = v["update"]["steps"] if v["update"] else 0
        print(
            f"{v['version']:>3} {v['stage']:<18} {v['train_images']:>5} "
            f"{100 * v['authorized_acc']:6.2f} {100 * full:6.2f} "
            f"{100 * (v['authorized_acc'] - full):+6.2f} {100 * v['unauthorized_acc']:6.2f} "
            f"{100 * v['random_key_acc']:7.2f} {steps:>5} {v['key_bytes']:>8} {v['base_bytes']:>8}"
        )
    for rule, row in result.get("rules", {}).items():
        accs = " ".join(f"{100 * v['authorized_acc']:6.2f}" for v in row["versions"])
        print(f"rule {rule:<10} authorized per version: {accs}")
    if "speed" in result:
        sp = result["speed"]
        print(
            f"samples/s key-only {sp['key_only_samples_per_s']} vs full {sp['full_samples_per_s']}"
            f" (ratio {sp['ratio']})"
        )
    print(f"total {result['seconds_total']} s")


if __name__ == "__main__":
    sys.exit(0 if main(get_args_parser().parse_args()) else 1)
