"""Load: 50 sites, each its own folder and key pair, pull concurrently from one real
`mlflow server` with S3 (moto) artifacts on 127.0.0.1.

The sites run as 10 threads in each of 5 worker processes (spawned, so memory stays at five
interpreters). All workers wait on one barrier, then pull `production` and export the
authorized model. Asserted: 0 failures and every site's model sha256 equal to the owner's.
p50/p95 pull times are printed (run with -s to see them).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.registry.conftest import make_locked, publish

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
SITES, PROCESSES = 50, 5
NAME = "load"


def _pull_one(directory: str) -> dict:
    from registry.site import Site

    site = Site(directory)
    t0 = time.perf_counter()
    try:
        result = site.pull("production")
        seconds = time.perf_counter() - t0
        exported = site.export()
        print(f"{Path(directory).name}: pulled in {seconds:.2f} s", flush=True)
        return {"dir": directory, "seconds": seconds, "version": result.version,
                "model_sha256": exported["model_sha256"], "error": None}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a failure is data here: the test counts them
        return {"dir": directory, "seconds": time.perf_counter() - t0, "error": repr(e)}


def _worker(dirs: list[str], start) -> list[dict]:
    """One process: import everything, wait for the common start, pull with one thread/site."""
    import registry.site  # noqa: F401 - import before the clock starts

    start.wait(timeout=600)  # a barrier: every worker is ready, then all pull at once
    with ThreadPoolExecutor(len(dirs)) as pool:
        return list(pool.map(_pull_one, dirs))


def test_fifty_sites_pull_concurrently(mlflow_server, tmp_path):
    from registry.keyring import OwnerKeyring
    from registry.site import Site
    from registry.store import KeyRegistry

    lm = make_locked(tmp_path, seed=5, versions=1)
    owner = OwnerKeyring.init(tmp_path / "owner")
    dirs = []
    for i in range(SITES):
        site = Site.init(
            tmp_path / "sites" / f"s{i:02d}",
            site_id=f"s{i:02d}",
            tracking_uri=mlflow_server.tracking_uri,
            model_name=NAME,
            owner_public_pem=owner.owner_public_pem,
        )
        owner.add_site(f"s{i:02d}", site.public_key_pem)
        dirs.append(str(site.directory))
    reg = KeyRegistry(mlflow_server.tracking_uri, NAME)
    reg.publish_base(lm.base_dir, base_sha256=lm.base_sha256)
    publish(reg, lm, owner, 1)
    reg.promote(1, owner=owner)

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(PROCESSES + 1)
        chunks = [dirs[i::PROCESSES] for i in range(PROCESSES)]
        with ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, c, start) for c in chunks]
            start.wait(timeout=600)
            t0 = time.perf_counter()
            results = [r for f in futures for r in f.result(timeout=2000)]
        wall = time.perf_counter() - t0

    failures = [r for r in results if r["error"]]
    assert len(results) == SITES and failures == []
    assert {r["model_sha256"] for r in results} == {lm.model_sha256[1]}
    assert all(r["version"] == 1 for r in results)
    times = sorted(r["seconds"] for r in results)
    p50 = statistics.median(times)
    p95 = times[min(len(times) - 1, round(0.95 * len(times)) - 1)]
    print(f"\nload: {SITES} sites in {PROCESSES} processes: p50 {p50:.2f} s, p95 {p95:.2f} s, "
          f"max {times[-1]:.2f} s, wall {wall:.1f} s")  # fmt: skip
    assert Path(dirs[0], "current").is_symlink()
