"""Issue 15, item 5: the streaming data path (adaloc.streaming) at scale.

1. Peak RSS of a key-only update (CNN, 5% key; ``--steps`` batches of a shuffled epoch, so
   any file of the folder can be read) over a PNG image folder read through DataLoader
   workers, for folders of each size in ``--sizes`` (default 10k and 100k, Fashion-MNIST
   images cycled). Each size runs in a fresh subprocess; reported: the trainer's own peak
   (ru_maxrss), the largest worker's, and the peak of the whole process tree (trainer +
   workers, sampled every 50 ms with psutil). Target: flat within 20%.
2. Samples/s of a key-only update on Fashion-MNIST's 60k training images: in-memory tensors
   (``fit``) vs the same images as PNGs streamed (``fit_stream``), alternated in fresh
   subprocesses, best of ``--rounds``, ``--steps`` batches each (0 = whole epochs).
   Target: streaming within 15% of in-memory.

    python bench/streaming.py --out runs/stream-bench

Image folders are written once under ``--out`` (100k PNGs take minutes) and reused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
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
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--steps",
        type=int,
        default=300,
        help="training steps per measurement (0 = one whole epoch); a shuffled sample of "
        "the whole folder, so every file can be hit",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # rss:DIR|memory|stream:DIR
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


def _tree_peak(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        try:
            procs = [me, *me.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
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
    from adaloc.streaming import fit_stream, image_folder, make_loader
    from adaloc.training import fit

    torch.set_num_threads(1)
    kind, _, path = spec.partition(":")
    model, mask = _model_and_mask()
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, device="cpu", amp=False)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_tree_peak, args=(stop, peak), daemon=True)
    sampler.start()
    if kind == "memory":
        train = load_dataset("fashion-mnist").train
        n = len(train)
        if args.steps:  # a seeded random sample of steps * batch_size images
            g = torch.Generator().manual_seed(0)
            train = train.subset(torch.randperm(n, generator=g)[: args.steps * args.batch_size])
        report = fit(model, train, cfg, mask=mask, progress=False)
    else:
        ds = image_folder(path)
        n = len(ds)
        loader = make_loader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        report = fit_stream(model, _first(loader, args.steps), cfg, mask=mask, progress=False)
        del loader  # stops the workers, so RUSAGE_CHILDREN covers them
    stop.set()
    sampler.join()
    mib = 1024.0  # ru_maxrss is in KiB on Linux
    return {
        "kind": kind,
        "images": n,
        "steps": report.steps,
        "seconds": report.seconds,
        "samples_per_s": report.steps * args.batch_size / report.seconds,
        "trainer_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib,
        "largest_worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / mib,
        "tree_peak_mib": peak[0] / 2**20,
    }


def _run_child(spec: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, "--workers", str(args.workers),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def plot(results: dict, path: Path) -> None:
    """Two panels: peak RSS per folder size, samples/s per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rss = results["rss"]
    labels = [f"{r['images']:,}" for r in rss]
    xs = range(len(rss))
    a.bar([x - 0.2 for x in xs], [r["tree_peak_mib"] for r in rss], 0.4, label="process tree")
    a.bar([x + 0.2 for x in xs], [r["trainer_peak_mib"] for r in rss], 0.4, label="trainer")
    a.set_xticks(list(xs), labels)
    a.set_xlabel("images in the folder")
    a.set_ylabel("peak RSS (MiB)")
    a.set_title("key-only update, streaming")
    a.legend(loc="lower right")
    speed = results["throughput"]
    b.bar(["in-memory", "streaming"], [speed["memory_best"], speed["stream_best"]])
    b.set_ylabel("samples/s (best of rounds)")
    b.set_title("Fashion-MNIST 60k, key-only update")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> dict:
    """Write the folders, run every measurement in its own process, save JSON + PNG."""
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    source = _write_source(out, max(sizes + [60000]))
    t0 = time.perf_counter()
    rss = [_run_child(f"rss:{_folder(out, n, source)}", args) for n in sizes]
    fashion = _folder(out, 60000, source)
    rounds = []
    for _ in range(args.rounds):
        rounds.append({"memory": _run_child("memory", args),
                       "stream": _run_child(f"stream:{fashion}", args)})  # fmt: skip
    mem_best = max(r["memory"]["samples_per_s"] for r in rounds)
    stream_best = max(r["stream"]["samples_per_s"] for r in rounds)
    small, big = rss[0], rss[-1]
    results = {
        "rss": rss,
        "rss_growth_tree": big["tree_peak_mib"] / small["tree_peak_mib"] - 1,
        "rss_growth_trainer": big["trainer_peak_mib"] / small["trainer_peak_mib"] - 1,
        "throughput": {
            "rounds": rounds,
            "memory_best": mem_best,
            "stream_best": stream_best,
            "stream_vs_memory": stream_best / mem_best,
        },
        "workers": args.workers,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
    }
    (out / "streaming.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "streaming.png")
    print(json.dumps({k: v for k, v in results.items() if k not in ("rss", "throughput")}))
    ratio = stream_best / mem_best
    print(f"stream/memory samples/s: {stream_best:.0f}/{mem_best:.0f} = {ratio:.2f}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
