"""bench/attacks.py's job runner: the recipe as a graph of jobs, run inline or in forked
worker processes that hand back figures as JSON and models as safetensors state dicts.

Hand-written rather than a process pool: each job must see every finished job's models
(forked children inherit them without pickling), and results cross back as safetensors +
JSON, never pickle (concurrent.futures and multiprocessing pickle both ways).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
