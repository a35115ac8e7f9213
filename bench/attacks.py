"""What is a stolen base worth? Attacks by a party holding the base and N labelled images.

    python bench/attacks.py --dataset fashion-mnist --model cnn --out DIR

Trains the owner's network on the base half of the training set, locks it several ways
(the paper's lock: magnitude rows, zero fill; the library default; hardened variants), and
prices each base against an attacker holding N = 1%, 5%, 10% of the training set (drawn
from the other half). Every attack and the scratch reference get the same hyperparameter
search, chosen on the attacker's validation split. Writes DIR/attacks.json, DIR/attacks.md
and DIR/attacks.png; ``bench/attacks_report.py`` assembles the rows and renders the table
and figure.

The work is a graph of independent jobs (owner, scratch per fraction, each attack per lock
and fraction, the token side), run in ``--workers`` forked processes (default 2, the
cores of this machine). Jobs hand models back as safetensors files and figures as JSON;
every job seeds itself, so the figures do not depend on the number of workers
(``bench/attacks_jobs.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaloc.attacks import (
    WEIGHT_ATTACKS,
    SearchSpace,
    attacker_donor,
    attacker_split,
    clone_fn,
    fresh_fn,
    infer_positions,
    position_report,
    scratch,
    search,
    shadow_detector,
    weight_attacks,
)
from adaloc.data import load_dataset, make_stages
from adaloc.evaluate import accuracy, chance_level
from adaloc.harden import HardenConfig
from adaloc.keys import KeyMask, KeySpec, select_key
from adaloc.lock import DONOR_FILLS, FILLS, decoy_donor, lock, random_key, unlock
from adaloc.models import build_model
from adaloc.token import Token
from adaloc.training import TrainConfig, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks_jobs import Job, run_jobs  # noqa: E402
from attacks_locks import DEFAULT_FILL, LOCKS, recipe  # noqa: E402
from attacks_report import assemble, plot, write_markdown  # noqa: E402
from attacks_token import _token_size, token_lock_model, token_rows  # noqa: E402


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
    p.add_argument(
        "--patience",
        type=int,
        default=2,
        help="stop a configuration after this many checkpoints without a new best (0 = off)",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel job processes (1 = inline)")
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


def _mask_json(mask: KeyMask) -> dict:
    return {
        "granularity": mask.granularity,
        "indices": {n: i.tolist() for n, i in mask.indices.items()},
    }


def _mask_from(d: dict) -> KeyMask:
    return KeyMask(
        {n: torch.tensor(i, dtype=torch.long) for n, i in d["indices"].items()}, d["granularity"]
    )


def main(args: argparse.Namespace) -> dict:
    """Run the recipe; write attacks.json / .md / .png; return the JSON dict."""
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    inline = args.workers <= 1
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
    grid = tuple((o, float(lr)) for o, lr in (g.split(":") for g in args.grid.split(",")))
    space = SearchSpace(
        grid=grid,
        steps=args.steps,
        checkpoints=args.checkpoints,
        patience=args.patience,
        seed=args.seed,
    )
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
        "workers": max(1, args.workers),
        "locks": {},
        "default_lock": "default",
    }
    cfg = HardenConfig(steps=args.harden_steps, alpha=args.harden_alpha, seed=args.seed)
    recipes = {name: recipe(name, make, cfg) for name in lock_names}
    specs = {name: r[0] for name, r in recipes.items()}
    fills = {name: r[1] for name, r in recipes.items()}
    hardens = {name: r[2] for name, r in recipes.items()}
    draws = {
        (frac, rep): attacker_split(
            pool, max(2, round(frac * n_train)), seed=args.seed + 1000 * rep + 1
        )
        for frac in fractions
        for rep in range(args.repeats)
    }

    def owner_job(done):
        torch.manual_seed(args.seed)
        owner = make()
        fit(
            owner,
            owner_train,
            TrainConfig(epochs=epochs, lr=0.05, seed=args.seed, device="cpu"),
            desc="owner",
            progress=progress and inline,
        )
        figures, models = {}, {"owner": owner}
        for name in lock_names:
            spec, fill, harden = specs[name], fills[name], hardens[name]
            mask = select_key(owner, spec, data=owner_train)
            t_h = time.perf_counter()
            model = harden(owner, mask, owner_train) if harden else owner
            donor = None
            if fill in DONOR_FILLS:  # a second owner network, trained alike, hardened elsewhere
                donor = fresh_fn(make, args.seed + 55)()
                fit(donor, owner_train, TrainConfig(epochs=epochs, lr=0.05, seed=args.seed + 55,
                    device="cpu"), desc="decoy", progress=progress and inline)  # fmt: skip
                donor = decoy_donor(donor, mask, model, owner_train, harden, seed=args.seed)
            base, key = lock(model, mask, fill=fill, seed=args.seed, donor=donor)
            models[f"model:{name}"], models[f"base:{name}"] = model, base
            figures[name] = {
                "mask": _mask_json(mask),
                "entry": {
                    "hardening": {  # the partial's own (steps, config): default has its own
                        **{k: v for k, v in harden.args[1].__dict__.items() if k != "objective"},
                        "steps": list(harden.args[0]),
                        "seconds": round(time.perf_counter() - t_h, 1),
                    }
                    if harden
                    else None,
                    "unhardened_owner_acc": accuracy(owner, test),
                    "owner_acc": accuracy(unlock(base, key), test),
                    "unauthorized_acc": accuracy(base, test),
                    "random_key_acc": accuracy(unlock(base, random_key(key, seed=args.seed)), test),
                    "key": _key_info(spec, fill, mask, owner),
                    "rows": [],
                },
            }
        return figures, models

    def lock_of(done, name):
        figures, models = done["owner"]
        return (
            models["owner"],
            models[f"model:{name}"],
            models[f"base:{name}"],
            _mask_from(figures[name]["mask"]),
        )

    def attack_vals(res, owner, spec, mask) -> dict:
        pos = position_report(owner, spec, res.positions, mask) if res.positions else None
        s = res.search
        return {
            "test": accuracy(res.model, test),
            "val": res.val_acc,
            "pos": pos.to_dict() if pos else None,
            "chosen": {"optimizer": s.optimizer, "lr": s.lr, "steps": s.steps},
        }

    def scratch_job(key):
        def fn(done):
            ref = scratch(fresh_fn(make, args.seed + 7), draws[key], space)
            return {"test": accuracy(ref.model, test), "val": ref.val_acc}, {"model": ref.model}

        return fn

    def positions_job(name, key):
        def fn(done):
            owner, _, base, _ = lock_of(done, name)
            det = shadow_detector(
                [done[f"scratch|{key}"][1]["model"]],
                base,
                specs[name],
                fills[name],
                draws[key],
                fresh_fn(make, 11),
                harden=hardens[name],
                make_donor=functools.partial(attacker_donor, make, draws[key], args.seed),
            )
            return _mask_json(infer_positions(base, specs[name], det)), {}

        return fn

    def attack_job(name, key, which):
        def fn(done):
            owner, _, base, mask = lock_of(done, name)
            inferred = None
            if which != ("finetune",):
                inferred = _mask_from(done[f"positions|{name}|{key}"][0])
            got = weight_attacks(
                base,
                specs[name],
                fresh_fn(make, args.seed + 7),
                draws[key],
                space,
                positions=inferred,
                attacks=which,
            )
            return {a: attack_vals(r, owner, specs[name], mask) for a, r in got.items()}, {}

        return fn

    def by_fill_job(name, key):
        def fn(done):
            owner, model, _, mask = lock_of(done, name)
            return _positions_by_fill(
                model,
                specs[name],
                mask,
                done[f"scratch|{key}"][1]["model"],
                draws[key],
                fresh_fn(make, 11),
                harden=hardens[name],
            ), {}

        return fn

    def token_lock_job(done):
        got = token_lock_model(args, bundle, owner_train, test, make, progress and inline)
        if got is None:
            return {"entry": None}, {}
        model, _, entry = got
        return {"entry": entry}, {"model": model}

    def token_job(frac):
        def fn(done):
            figures, models = done["tokenlock"]
            # the bench's token is seeded (token_lock_model): re-made here, never written
            token = Token.generate("binary", figures["entry"]["key"]["token_size"], args.seed + 5)
            rows = token_rows(
                args,
                models["model"],
                token,
                draws[(frac, 0)],
                frac,
                test,
                space,
                bundle.num_classes,
            )
            return {"rows": rows}, {}

        return fn

    jobs = [Job("owner", owner_job, cost=2.0)]
    refill = tuple(a for a in attacks if a != "finetune")
    pos_stage = tuple(a for a in refill if a != "refill_all")
    for key in draws:
        frac, rep = key
        jobs.append(Job(f"scratch|{key}", scratch_job(key)))
        for name in lock_names:
            if "finetune" in attacks:
                jobs.append(
                    Job(f"finetune|{name}|{key}", attack_job(name, key, ("finetune",)), ("owner",))
                )
            if refill:
                deps = ("owner", f"scratch|{key}")
                jobs.append(Job(f"positions|{name}|{key}", positions_job(name, key), deps, 0.2))
                pdeps = (f"positions|{name}|{key}",)
                if "refill_all" in refill:
                    jobs.append(
                        Job(
                            f"refill_all|{name}|{key}",
                            attack_job(name, key, ("refill_all",)),
                            pdeps,
                        )
                    )
                if pos_stage:
                    jobs.append(
                        Job(
                            f"refill_positions|{name}|{key}",
                            attack_job(name, key, pos_stage),
                            pdeps,
                            1.0 + len(pos_stage) - 1,
                        )
                    )
            if rep == 0 and frac == fractions[0]:
                deps = ("owner", f"scratch|{key}")
                jobs.append(Job(f"by_fill|{name}", by_fill_job(name, key), deps, 0.5))
    if args.token_size != 0 and _token_size(args, bundle) is None:
        print(
            f"token side skipped: a {args.token_size}-cell token does not fit {bundle.image_size}"
        )
    elif args.token_size != 0:
        jobs.append(Job("tokenlock", token_lock_job, cost=3.0))
        jobs += [Job(f"token|{frac}", token_job(frac), ("tokenlock",), 1.5) for frac in fractions]

    bar = tqdm(total=len(jobs), desc="attacks", disable=not progress, unit="job")
    names = [j.name for j in jobs]

    def on_done(name, done):
        bar.update(1)
        assemble(result, done, names, lock_names, fractions, args.repeats, draws)
        # a long run keeps what it has measured so far (re-draw with bench/attacks_report.py)
        (out / "attacks.json").write_text(json.dumps(result, indent=2))

    if not inline:
        _warm_up(make, pool, space)
    run_jobs(jobs, make, args.workers, on_done=on_done)
    bar.close()
    result["seconds_total"] = round(time.perf_counter() - t0, 1)
    result["cpu_seconds_total"] = round(_cpu_seconds() - c0, 1)
    (out / "attacks.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "attacks.md")
    plot(result, out / "attacks.png")
    print((out / "attacks.md").read_text())
    return result


def _warm_up(make, pool, space: SearchSpace) -> None:
    """Pay torch's one-off first-call costs (about 1.5 s of CPU) once, before forking."""
    data = attacker_split(pool, min(len(pool), 80), seed=0)
    tiny = dataclasses.replace(space, steps=2, checkpoints=1, patience=0)
    model = search(make, data.train, data.val, tiny).model
    spec = KeySpec()
    mask = select_key(model, spec, data=data.train)
    search(clone_fn(model), data.train, data.val, tiny, mask=mask)
    lock(model, mask, fill=DEFAULT_FILL, seed=0)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main(get_args_parser().parse_args())
