"""Issue 15, item 5: the streaming data path (adaloc.streaming, adaloc.shards) at scale.

1. Peak RSS of a key-only update (CNN, 5% key; ``--steps`` batches of a shuffled epoch, so
   any sample can be read) over a PNG image folder (``--workers`` DataLoader workers) and
   over the same images as uint8 shards (``--shard-workers``), for each size in ``--sizes``
   (default 10k and 100k, Fashion-MNIST images cycled). Each run is a fresh subprocess;
   reported: the trainer's own peak (ru_maxrss), the largest worker's, and the peak of the
   whole process tree (trainer + workers, sampled every 50 ms with psutil). Target: flat
   within 20%.
2. Samples/s of a key-only update on Fashion-MNIST's 60k training images: in-memory tensors
   (``fit``) vs the same images streamed (``fit_stream``) as PNGs and as shards, alternated
   in fresh subprocesses for ``--rounds`` rounds (best and median), ``--steps`` batches each
   (0 = whole epochs). Target: streaming within 15% of in-memory.

    python bench/streaming.py --out runs/stream-bench

Image folders and shards are written once under ``--out`` (100k PNGs take minutes) and
reused. ``--skip-rss`` runs the throughput rounds only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from adaloc.data import load_dataset
from adaloc.keys import KeySpec, select_key
from adaloc.models import build_model
from adaloc.training import TrainConfig

FASHION_CLASSES = [f"{c:02d}" for c in range(10)]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/stream-bench")
    p.add_argument("--sizes", default="10000,100000", help="comma list of folder sizes")
    p.add_argument("--rounds", type=int, default=2, help="alternated throughput rounds")
    p.add_argument("--workers", type=int, default=2, help="loader workers, PNG folder")
    p.add_argument("--shard-workers", type=int, default=0, help="loader workers, shards")
    p.add_argument("--skip-rss", action="store_true", help="throughput rounds only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--steps",
        type=int,
        default=300,
        help="training steps per measurement (0 = one whole epoch); a shuffled sample of "
        "the whole folder, so every file can be hit",
    )
    # child spec: memory | stream:DIR (PNG folder) | shards:DIR, with a "rss-" prefix for part 1
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _folder(out: Path, n: int, source: Path) -> Path:
    """``out/images-N/train``: the first n files of the ``source`` folder, hard-linked."""
    folder = out / f"images-{n}" / "train"
    done = folder.parent / "DONE"
    if done.exists():
        return folder
    for c in FASHION_CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for f in (source / c).iterdir():
            if int(f.stem) < n and not (folder / c / f.name).exists():
                os.link(f, folder / c / f.name)
    done.write_text(str(n))
    return folder


def _shards(out: Path, n: int, folder: Path) -> Path:
    """``out/shards-N/train``: the n images of ``folder`` as shards (adaloc.shards)."""
    from adaloc.shards import write_shards
    from adaloc.streaming import image_folder

    shards = out / f"shards-{n}" / "train"
    if not shards.exists():
        write_shards(image_folder(folder), shards, classes=FASHION_CLASSES, num_workers=2)
    return shards


def _write_source(out: Path, n: int) -> Path:
    """All ``n`` PNGs once (file k = Fashion-MNIST training image k mod 60,000)."""
    from adaloc.streaming import write_image_folder

    folder = out / f"source-{n}"
    if not (folder / "DONE").exists():
        train = load_dataset("fashion-mnist").train
        write_image_folder(train, folder, classes=FASHION_CLASSES, count=n)
        (folder / "DONE").write_text(str(n))
    return folder


def _model_and_mask():
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    return model, select_key(model, KeySpec(budget=0.05))


def _tree_peak(stop: threading.Event, peak: dict, pss: bool) -> None:
    """Sample RSS every 50 ms: the trainer's, the largest worker's, their sum, and (``pss``)
    the tree's proportional set size, which counts pages the forked workers share once.

    Sampled, not ``ru_maxrss``: Linux carries the parent's high-water mark into a child
    across fork + exec, so a child's ru_maxrss can report the bench parent's peak."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        try:
            kids = me.children(recursive=True)
            own, rss = me.memory_info().rss, [k.memory_info().rss for k in kids]
            peak["trainer"] = max(peak["trainer"], own)
            peak["worker"] = max([peak["worker"], *rss])
            peak["tree"] = max(peak["tree"], own + sum(rss))
            if pss:
                total = sum(p.memory_full_info().pss for p in (me, *kids))
                peak["tree_pss"] = max(peak["tree_pss"], total)
        except psutil.Error:
            pass
        time.sleep(0.05)


class _first:
    """The first ``steps`` batches of ``loader`` each epoch (all of them for 0)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps or len(loader)

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


def child(spec: str, args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    from adaloc.shards import ShardSet
    from adaloc.streaming import fit_stream, image_folder, make_loader
    from adaloc.training import fit

    torch.set_num_threads(1)
    kind, _, path = spec.removeprefix("rss-").partition(":")
    load_before = os.getloadavg()[0]
    model, mask = _model_and_mask()
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, device="cpu", amp=False)
    stop, peak = threading.Event(), dict.fromkeys(("trainer", "worker", "tree", "tree_pss"), 0)
    sampler = threading.Thread(
        target=_tree_peak, args=(stop, peak, spec.startswith("rss-")), daemon=True
    )
    sampler.start()
    if kind == "memory":
        train = load_dataset("fashion-mnist").train
        n = len(train)
        if args.steps:  # a seeded random sample of steps * batch_size images
            g = torch.Generator().manual_seed(0)
            train = train.subset(torch.randperm(n, generator=g)[: args.steps * args.batch_size])
        report = fit(model, train, cfg, mask=mask, progress=False)
    else:
        ds = ShardSet(path) if kind == "shards" else image_folder(path)
        workers = args.shard_workers if kind == "shards" else args.workers
        n = len(ds)
        loader = make_loader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers)
        report = fit_stream(model, _first(loader, args.steps), cfg, mask=mask, progress=False)
        del loader  # stops the workers, so RUSAGE_CHILDREN covers them
    stop.set()
    sampler.join()
    mib = 2.0**20
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return {
        "kind": spec.partition(":")[0],
        "workers": 0 if kind == "memory" else workers,
        "load_avg_1min_before": load_before,
        "cpu_s_trainer": me.ru_utime + me.ru_stime,
        "cpu_s_workers": kids.ru_utime + kids.ru_stime,
        "images": n,
        "steps": report.steps,
        "seconds": report.seconds,
        "samples_per_s": report.steps * args.batch_size / report.seconds,
        "trainer_peak_mib": peak["trainer"] / mib,
        "largest_worker_peak_mib": peak["worker"] / mib,
        "tree_peak_mib": peak["tree"] / mib,
        "tree_peak_pss_mib": peak["tree_pss"] / mib or None,
    }


def _run_child(spec: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, "--workers", str(args.workers),
           "--shard-workers", str(args.shard_workers), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def plot(results: dict, path: Path) -> None:
    """Two panels: peak RSS per set size and source, samples/s per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [("PNG", r) for r in results.get("rss", [])]
    runs += [("shards", r) for r in results.get("rss_shards", [])]
    xs = range(len(runs))
    a.bar([x - 0.2 for x in xs], [r["tree_peak_mib"] for _, r in runs], 0.4, label="process tree")
    a.bar([x + 0.2 for x in xs], [r["trainer_peak_mib"] for _, r in runs], 0.4, label="trainer")
    a.set_xticks(list(xs), [f"{k}\n{r['images']:,}" for k, r in runs])
    a.set_ylabel("peak RSS (MiB)")
    a.set_title("key-only update, streaming")
    a.legend(loc="lower right")
    speed = results["throughput"]
    kinds = [k for k in KINDS if f"{k}_best" in speed]
    b.bar([LABELS[k] for k in kinds], [speed[f"{k}_median"] for k in kinds], label="median")
    b.scatter([LABELS[k] for k in kinds], [speed[f"{k}_best"] for k in kinds], color="k",
              zorder=3, label="best")  # fmt: skip
    b.set_ylabel(f"samples/s ({len(speed['rounds'])} rounds)")
    b.set_title("Fashion-MNIST 60k, key-only update")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


KINDS = ("memory", "stream", "shards")
LABELS = {"memory": "in-memory", "stream": "PNG folder", "shards": "uint8 shards"}


def _rss(out: Path, sizes: list[int], source: Path, kind: str, args) -> dict:
    make = _folder if kind == "stream" else lambda o, n, s: _shards(o, n, _folder(o, n, s))
    runs = [_run_child(f"rss-{kind}:{make(out, n, source)}", args) for n in sizes]
    small, big = runs[0], runs[-1]
    return {
        "runs": runs,
        "growth_tree": big["tree_peak_mib"] / small["tree_peak_mib"] - 1,
        "growth_trainer": big["trainer_peak_mib"] / small["trainer_peak_mib"] - 1,
        "growth_tree_pss": big["tree_peak_pss_mib"] / small["tree_peak_pss_mib"] - 1,
    }


def _throughput(out: Path, source: Path, args) -> dict:
    specs = {
        "memory": "memory",
        "stream": f"stream:{_folder(out, 60000, source)}",
        "shards": f"shards:{_shards(out, 60000, _folder(out, 60000, source))}",
    }
    rounds = []
    for r in range(args.rounds):
        order = KINDS[r % 3 :] + KINDS[: r % 3]  # rotate who runs first
        rounds.append({k: _run_child(specs[k], args) for k in order})
    speed: dict = {"rounds": rounds}
    for k in KINDS:
        values = [rd[k]["samples_per_s"] for rd in rounds]
        speed[f"{k}_best"], speed[f"{k}_median"] = max(values), statistics.median(values)
    for k in ("stream", "shards"):
        speed[f"{k}_vs_memory"] = speed[f"{k}_best"] / speed["memory_best"]
        speed[f"{k}_vs_memory_median"] = speed[f"{k}_median"] / speed["memory_median"]
        speed[f"{k}_vs_memory_per_round"] = [
            rd[k]["samples_per_s"] / rd["memory"]["samples_per_s"] for rd in rounds
        ]
    return speed


def main(args: argparse.Namespace) -> dict:
    """Write the folders and shards, run every measurement in its own process, save JSON +
    PNG (``--skip-rss`` keeps the RSS part of an earlier ``streaming.json``)."""
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    source = _write_source(out, max(sizes + [60000]))
    t0 = time.perf_counter()
    results: dict = {}
    if args.skip_rss and (out / "streaming.json").exists():
        old = json.loads((out / "streaming.json").read_text())
        results = {k: v for k, v in old.items() if k.startswith("rss")}
    if not args.skip_rss:
        png, shards = (
            _rss(out, sizes, source, "stream", args),
            _rss(out, sizes, source, "shards", args),
        )
        results |= {
            "rss": png["runs"],
            "rss_growth_tree": png["growth_tree"],
            "rss_growth_trainer": png["growth_trainer"],
            "rss_growth_tree_pss": png["growth_tree_pss"],
            "rss_shards": shards["runs"],
            "rss_growth_tree_shards": shards["growth_tree"],
            "rss_growth_trainer_shards": shards["growth_trainer"],
            "rss_growth_tree_pss_shards": shards["growth_tree_pss"],
        }
    results |= {
        "throughput": _throughput(out, source, args),
        "workers": args.workers,
        "shard_workers": args.shard_workers,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
    }
    (out / "streaming.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "streaming.png")
    print(json.dumps({k: v for k, v in results.items() if not k.startswith(("rss", "throughput"))}))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("rss_growth")}))
    speed = results["throughput"]
    for k in ("stream", "shards"):
        print(f"{LABELS[k]}/in-memory samples/s: best {speed[f'{k}_best']:.0f}/"
              f"{speed['memory_best']:.0f} = {speed[f'{k}_vs_memory']:.2f}, median "
              f"{speed[f'{k}_vs_memory_median']:.2f}")  # fmt: skip
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
