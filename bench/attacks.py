"""What is a stolen base worth? Attacks by a party holding the base and N labelled images.

    python bench/attacks.py --dataset fashion-mnist --model cnn --out DIR

Trains the owner's network on the base half of the training set, locks it several ways
(the paper's lock: magnitude rows, zero fill; the library default; hardened variants), and
prices each base against an attacker holding N = 1%, 5%, 10% of the training set (drawn
from the other half). Every attack and the scratch reference get the same hyperparameter
search, chosen on the attacker's validation split. Writes DIR/attacks.json, DIR/attacks.md
and DIR/attacks.png; ``bench/attacks_report.py`` renders the table and figure.

The work is a graph of independent jobs (owner, scratch per fraction, each attack per lock
and fraction, the token side), run in ``--workers`` forked processes (default 2, the
cores of this machine). Jobs hand models back as safetensors files and figures as JSON;
every job seeds itself, so the figures do not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from adaloc.attacks import (
    WEIGHT_ATTACKS,
    SearchSpace,
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
from adaloc.harden import HardenConfig, balance_fanout, default_hardening, nontransferable
from adaloc.keys import KeyMask, KeySpec, default_spec, select_key
from adaloc.lock import FILLS, lock, random_key, unlock
from adaloc.models import build_model
from adaloc.token import Token
from adaloc.training import TrainConfig, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks_report import plot, write_markdown  # noqa: E402
from attacks_token import _token_size, token_lock_model, token_rows  # noqa: E402

DEFAULT_FILL = inspect.signature(lock).parameters["fill"].default
LOCKS = {
    # name: (KeySpec overrides, fill[, hardening steps]); "default" follows the library:
    # lock()'s fill, default_spec() and default_hardening() of the model (_default_lock)
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


@dataclasses.dataclass
class Job:
    """One unit of the recipe: ``fn(done) -> (figures as JSON, {name: model})``."""

    name: str
    fn: Callable[[dict], tuple[dict, dict]]
    deps: tuple[str, ...] = ()
    cost: float = 1.0


def run_jobs(jobs: list[Job], make, workers: int, on_done=None) -> dict:
    """Run ``jobs`` respecting ``deps``; returns ``{name: (json, {name: model})}``.

    ``workers`` > 1: each job runs in a forked child (it sees every finished job's output)
    and hands its figures back as JSON and its models as safetensors state dicts, rebuilt
    with ``make()``. Ready jobs start longest remaining path first. ``on_done(name, done)``
    runs in the parent after each job. Every job runs on one torch thread, inline or forked,
    so the figures and models do not depend on ``workers`` (threads change float sums).
    """
    by_name = {j.name: j for j in jobs}
    rank: dict[str, float] = {}

    def path(name: str) -> float:  # cost of the longest chain of jobs starting at ``name``
        if name not in rank:
            after = [path(j.name) for j in jobs if name in j.deps]
            rank[name] = by_name[name].cost + max(after, default=0.0)
        return rank[name]

    done: dict = {}
    pending = sorted(jobs, key=lambda j: -path(j.name))
    running: dict[int, tuple] = {}
    old = signal.signal(signal.SIGTERM, _raise_exit) if workers > 1 else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="attacks-") as tmp:
            _loop(pending, running, done, tmp, make, workers, on_done)
    finally:
        for pid in running:  # a failed job or a timeout: stop the others, reap them
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        torch.set_num_threads(threads)
    return done


def _raise_exit(signum, frame):
    # `timeout` signals the process and then its group: the second one must not cut the cleanup
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _loop(pending, running, done, tmp, make, workers, on_done) -> None:
    while pending or running:
        ready = [j for j in pending if all(d in done for d in j.deps)]
        if not ready and not running:
            raise RuntimeError(f"jobs with unmet dependencies: {[j.name for j in pending]}")
        for job in ready:
            if workers > 1 and len(running) >= workers:
                break
            pending.remove(job)
            if workers <= 1:
                done[job.name] = job.fn(done)
                if on_done:
                    on_done(job.name, done)
                continue
            stem = Path(tmp) / f"job{len(done) + len(running)}-{os.getpid()}"
            pid = os.fork()
            if pid == 0:  # child: run, write, leave without running the parent's cleanup
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    torch.set_num_threads(1)
                    _write_job(stem, *job.fn(done))
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = (job, stem)
        if workers <= 1 or not running:
            continue
        pid, status = os.waitpid(-1, 0)
        if pid not in running:
            continue
        job, stem = running.pop(pid)
        if status != 0:
            raise RuntimeError(f"job {job.name} failed (status {status}); see its traceback")
        done[job.name] = _read_job(stem, make)
        if on_done:
            on_done(job.name, done)


def _write_job(stem: Path, figures: dict, models: dict) -> None:
    tensors = {
        f"{m}/{k}": v.detach().clone().contiguous()
        for m, model in models.items()
        for k, v in model.state_dict().items()
    }
    save_file(tensors, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps({"figures": figures, "models": list(models)}))


def _read_job(stem: Path, make) -> tuple[dict, dict]:
    meta = json.loads(Path(f"{stem}.json").read_text())
    tensors = load_file(f"{stem}.safetensors")
    models = {}
    for m in meta["models"]:
        model = make()
        prefix = f"{m}/"
        model.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        models[m] = model.eval()
    return meta["figures"], models


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
    hardens = {
        name: functools.partial(_harden, tuple(LOCKS[name][2:]), cfg, make)
        if LOCKS[name][2:]
        else None
        for name in lock_names
    }
    specs = {name: KeySpec(**LOCKS[name][0]) for name in lock_names}
    if "default" in lock_names:  # the library's rule for this architecture, as the flows use
        specs["default"], hardens["default"] = _default_lock(make, args.seed)
    fills = {name: LOCKS[name][1] for name in lock_names}
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
            base, key = lock(model, mask, fill=fill, seed=args.seed)
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
        _assemble(result, done, names, lock_names, fractions, args.repeats, draws)
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


def _assemble(result: dict, done: dict, jobs: list[str], lock_names, fractions, repeats, draws):
    """Fill ``result['locks']`` from the finished jobs (rows only for complete fractions)."""
    if "owner" not in done:
        return
    figures = done["owner"][0]
    for name in lock_names:
        entry = {**figures[name]["entry"], "rows": []}
        if f"by_fill|{name}" in done:
            entry["positions_by_fill"] = done[f"by_fill|{name}"][0]
        for frac in fractions:
            keys = [(frac, rep) for rep in range(repeats)]
            want = [
                j
                for key in keys
                for j in jobs
                if j.endswith(f"|{name}|{key}") and not j.startswith("positions|")
            ]
            want += [f"scratch|{key}" for key in keys]
            if not all(j in done for j in want):
                continue
            per_attack: dict = {}
            for key in keys:
                scratch_acc = done[f"scratch|{key}"][0]["test"]
                for j in want:
                    if j.endswith(f"|{name}|{key}"):
                        for attack, v in done[j][0].items():
                            per_attack.setdefault(attack, []).append({**v, "scratch": scratch_acc})
            if not per_attack:
                continue
            n = draws[keys[0]].n
            for attack in sorted(per_attack, key=WEIGHT_ATTACKS.index):
                entry["rows"].append(_row(attack, frac, n, per_attack[attack]))
            # the attacker's own pick: the attack with the best validation accuracy
            best = max(per_attack, key=lambda a: sum(v["val"] for v in per_attack[a]))
            entry["rows"].append(
                {**_row(best, frac, n, per_attack[best]), "attack": "best", "picked": best}
            )
        result["locks"][name] = entry
    if "tokenlock" in done and done["tokenlock"][0]["entry"] is not None:
        entry = {**done["tokenlock"][0]["entry"], "rows": []}
        for frac in fractions:
            if f"token|{frac}" not in done or f"scratch|{(frac, 0)}" not in done:
                continue
            scratch_acc = done[f"scratch|{(frac, 0)}"][0]["test"]
            for row in done[f"token|{frac}"][0]["rows"]:
                leak = 100 * (row["attacked_acc"] - scratch_acc)
                entry["rows"].append({**row, "scratch_acc": scratch_acc, "leak_pt": leak})
        result["locks"]["tokenlock"] = entry


def _default_lock(make, seed: int):
    """(KeySpec, hardening) of the ``default`` lock: :func:`adaloc.keys.default_spec` and
    :func:`adaloc.harden.default_hardening` for ``make()``'s architecture (the CNN: KeySpec()
    and none; a norm-free MLP: first-layer rows and the alpha-6 probe training + polish).
    ``--harden-alpha`` / ``--harden-steps`` do not apply to it."""
    model = make()
    hc = default_hardening(model)
    if hc is None:
        return default_spec(model), None
    return default_spec(model), functools.partial(
        _harden, (hc.objective,), dataclasses.replace(hc, seed=seed), make
    )


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


def _row(attack: str, frac: float, n: int, vals: list[dict]) -> dict:
    k = len(vals)
    att = sum(v["test"] for v in vals) / k
    scr = sum(v["scratch"] for v in vals) / k
    pos = [v["pos"] for v in vals if v["pos"] is not None]
    return {
        "attack": attack,
        "fraction": frac,
        "n": n,
        "attacked_acc": att,
        "scratch_acc": scr,
        "leak_pt": 100 * (att - scr),
        "positions_precision": sum(p["precision"] for p in pos) / len(pos) if pos else None,
        "positions_recall": sum(p["recall"] for p in pos) / len(pos) if pos else None,
        "positions_share": pos[0]["share"] if pos else None,
        "val_acc": sum(v["val"] for v in vals) / k,
        "chosen": vals[-1]["chosen"],
    }


if __name__ == "__main__":
    main(get_args_parser().parse_args())
