"""Issue 15: does the registry slow down as key versions pile up?

On a real ``mlflow server`` (+ moto S3) on 127.0.0.1 the owner publishes key versions
1..``--versions`` of one locked CNN through the public ``KeyRegistry.publish_key`` API (each
a key-only update of the previous one), promoting each to ``production``. A second model on the
same server keeps a single key version. At each checkpoint (1, 10, 100, 1000 versions) it
times both models, interleaved run by run so both see the same load, median of
``--repeats``:

- ``resolve``: what a site trusts for ``production``: the newest owner-signed timestamp
  (trust-run search, listing, timestamp download, signatures, freshness) and the signed
  promotion in it, from a fresh registry object (``registry.trust_io``);
- ``resolve_mlflow``: ``KeyRegistry.resolve("production")`` (the MLflow alias, a hint for
  people and the UI) from a fresh registry object;
- ``pull``: ``Site.pull("production")`` into a fresh copy of the site folder that keeps only
  what a long-lived site holds before a new version appears (its keys, config, accepted root,
  rollback counter, lookup hints and the verified base), so every pull resolves, downloads
  the targets record and the sealed key, verifies, decrypts and installs it.

Reported: the ratio many/one at each checkpoint. Target: <= 2x at 1,000 versions. Versions
are promoted to production at each checkpoint (a promotion re-signs the timestamp; doing it
for every version would only slow the owner's side of the run).

    python bench/registry_scale.py --out runs/registry-scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaloc.artifact import ModelCard, save_base
from adaloc.keys import KeySpec, select_key
from adaloc.lock import Key, lock, state_sha256, unlock
from adaloc.models import build_model

MODEL = {"in_channels": 1, "num_classes": 10, "image_size": 28}
SPEC = KeySpec(budget=0.05)  # one 5% key for both models


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=1000)
    p.add_argument("--checkpoints", default="1,10,100,1000")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="runs/registry-scale")
    return p


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return proc.stdout.strip()


# What a site holds before a new key version appears; everything else is per version.
KEEP = ("site.json", "site.key", "site.pub", "owner.pub", "seen.json", "trust", "cache/bases",
        "cache/registry.json")  # fmt: skip


def fresh_site(site_dir: Path, dst: Path) -> Path:
    """A copy of ``site_dir`` with only :data:`KEEP` (no installed set, no cached targets or
    sealed keys): pulling into it is a full pull of the current version."""

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for name in KEEP:
        src = site_dir / name
        if src.is_dir():
            shutil.copytree(src, dst / name)
        elif src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def _probes(reg_uri: str, name: str, site_dir: Path, version: int, sha: str, owner_pem: bytes):
    from registry import KeyRegistry, Site
    from registry import trust as T
    from registry import trust_io as IO

    def resolve():
        reg = KeyRegistry(reg_uri, name)
        _, ts, root, _ = IO.newest_timestamp(reg, T.anchor_root(name, owner_pem))
        IO.check_fresh(ts)
        assert IO.resolve_ref(ts, root, "production") == version

    def resolve_mlflow():
        assert KeyRegistry(reg_uri, name).resolve("production").version == version

    def pull():
        site = Site(fresh_site(site_dir, site_dir.with_name(site_dir.name + "-probe")))
        r = site.pull("production")
        assert r.version == version and r.model_sha256 == sha, "site model differs"
        assert r.changed and r.bytes_key > 0 and r.bytes_base == 0, "not a full key pull"

    return {"resolve": resolve, "resolve_mlflow": resolve_mlflow, "pull": pull}


def measure(reg_uri: str, many: tuple, one: tuple, repeats: int) -> dict:
    """Median resolve and pull times of the model with many versions and of the model with
    one, interleaved run by run so both see the same machine load."""
    probes = {"many": _probes(reg_uri, *many), "one": _probes(reg_uri, *one)}
    for ops in probes.values():
        for op in ops.values():
            op()  # untimed warm-up (first connections, imports)
    runs = {f"{k}_{op}": [] for k in probes for op in probes[k]}
    for _ in range(repeats):
        for k, ops in probes.items():
            for op, fn in ops.items():
                runs[f"{k}_{op}"] += _timed(fn, 1)
    row = {"versions": many[2], **{f"{k}_s": statistics.median(v) for k, v in runs.items()}}
    for op in probes["many"]:
        row[f"{op}_ratio"] = row[f"many_{op}_s"] / row[f"one_{op}_s"]
    return row | {"runs": runs}


def plot(rows: list[dict], path: Path) -> None:
    """Median resolve and pull time vs number of key versions (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["versions"] for r in rows]
    ax.plot(xs, [r["resolve_ratio"] for r in rows], "o-", label="signed resolve (site)")
    ax.plot(xs, [r["resolve_mlflow_ratio"] for r in rows], "^-", label="MLflow alias resolve")
    ax.plot(xs, [r["pull_ratio"] for r in rows], "s-", label='Site.pull("production")')
    ax.axhline(2.0, color="grey", ls="--", label="target (2x)")
    ax.set_xscale("log")
    ax.set_xlabel("published key versions")
    ax.set_ylabel("time vs a model with 1 version (ratio)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("registry at scale (mlflow server + S3 on loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_markdown(rows: list[dict], path: Path) -> None:
    """One row per checkpoint: medians (ms) for many vs one version, and the ratios."""
    lines = ["| versions | signed resolve ms (many / one) | ratio | MLflow alias resolve ms | "
             "ratio | site pull ms (many / one) | ratio | publish s (median of last 10) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ms = {k: v * 1e3 for k, v in r.items() if k.endswith("_s") and isinstance(v, float)}
        lines.append(
            f"| {r['versions']} | {ms['many_resolve_s']:.0f} / {ms['one_resolve_s']:.0f} | "
            f"{r['resolve_ratio']:.2f} | {ms['many_resolve_mlflow_s']:.0f} / "
            f"{ms['one_resolve_mlflow_s']:.0f} | {r['resolve_mlflow_ratio']:.2f} | "
            f"{ms['many_pull_s']:.0f} / {ms['one_pull_s']:.0f} | {r['pull_ratio']:.2f} | "
            f"{r.get('publish_s_median_last_10', float('nan')):.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _locked_base(seed: int, out: Path) -> tuple:
    """(base, key, saved-base record) of a freshly built CNN locked with a 5% key."""
    torch.manual_seed(seed)
    model = build_model("cnn", **MODEL)
    base, key = lock(model, select_key(model, SPEC))
    card = ModelCard("cnn", dict(MODEL), 10, [1, 28, 28], SPEC.to_dict())
    return base, key, save_base(base, card, out)


def _one_version_model(uri: str, work: Path, owner) -> tuple:
    """A second locked model on the same server with a single key version, and its site."""
    from registry import KeyRegistry, Site

    base, key, saved = _locked_base(1, work / "base-one")
    reg = KeyRegistry(uri, "one")
    reg.publish_base(work / "base-one", base_sha256=saved["sha256"])
    sha = state_sha256(unlock(base, key))
    site = Site.init(work / "site-one", site_id="site-one", tracking_uri=uri, model_name="one",
                     owner_public_pem=owner.owner_public_pem)  # fmt: skip
    owner.add_site("site-one", site.public_key_pem)
    reg.publish_key(key, owner=owner, model_sha256=sha, key_spec=SPEC.to_dict())
    reg.promote(1, owner=owner)
    Site(work / "site-one").pull("production")  # the base cache, root, hints of a live site
    return "one", work / "site-one", 1, sha, owner.owner_public_pem


_SCRATCH: list[Path] = []  # removed by the signal handler (os._exit skips the with blocks)


def _stop_on_signals() -> None:
    """SIGTERM / SIGINT stop the servers' process groups right away
    (``registry.local_servers.stop_all_servers`` -> ``stop_process_group``), then exit with
    128 + the signal. Raising into the main thread instead can stop it inside a lock taken
    by a worker thread and hang the clean-up (seen: a SIGTERM mid-publish left the server up).
    Partial results are already on disk (written at each checkpoint); moto is a thread of
    this process and ends with it."""
    from registry.local_servers import stop_all_servers

    def handler(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up
        stop_all_servers()
        for path in _SCRATCH:  # what TemporaryDirectory would have removed
            shutil.rmtree(path, ignore_errors=True)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main(args: argparse.Namespace) -> dict:
    """Publish versions, measure at each checkpoint, write JSON + PNG."""
    _stop_on_signals()
    from registry import KeyRegistry, OwnerKeyring, Site
    from registry.local_servers import mlflow_server, moto_s3

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    torch.set_num_threads(1)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(",") if int(c) <= args.versions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code = {"head": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "main": _git("rev-parse", "main")}  # fmt: skip
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, moto_s3("scale") as s3:
        work = Path(tmp)
        _SCRATCH.append(work)
        with mlflow_server(work / "server", s3=s3, timeout_s=900) as server:
            uri, name = server.tracking_uri, "scale"
            reg = KeyRegistry(uri, name)
            owner = OwnerKeyring.init(work / "owner")
            site = Site.init(work / "site", site_id="site-1", tracking_uri=uri, model_name=name,
                             owner_public_pem=owner.owner_public_pem)  # fmt: skip
            owner.add_site("site-1", site.public_key_pem)
            one = _one_version_model(uri, work, owner)
            base, key, saved = _locked_base(0, work / "base")
            reg.publish_base(work / "base", base_sha256=saved["sha256"])
            g, rows, publish_s = torch.Generator().manual_seed(1), [], []
            for v in tqdm(range(1, args.versions + 1), desc="publish", unit="version"):
                if v > 1:  # a key-only update: only the values at the key positions change
                    values = {n: t + 0.01 * torch.randn(t.shape, generator=g)
                              for n, t in key.values.items()}  # fmt: skip
                    key = Key(key.mask, values, key.base_sha256, version=v, parent=v - 1)
                sha = state_sha256(unlock(base, key))
                t = time.perf_counter()
                reg.publish_key(key, owner=owner, model_sha256=sha, key_spec=SPEC.to_dict(),
                                metrics={"bench": 1.0})  # fmt: skip
                publish_s.append(time.perf_counter() - t)
                if v in checkpoints:
                    reg.promote(v, owner=owner)
                    site.pull("production")  # the live site: base cache, root, hints
                    many = (name, work / "site", v, sha, owner.owner_public_pem)
                    rows.append(measure(uri, many, one, args.repeats))
                    r = rows[-1]
                    r["publish_s_last"] = publish_s[-1]
                    r["publish_s_median_last_10"] = statistics.median(publish_s[-10:])
                    r["load_avg"] = os.getloadavg()
                    partial = {"rows": rows, "code": code, "partial": v < args.versions,
                               "publish_s": publish_s}  # fmt: skip
                    (out / "registry_scale.json").write_text(json.dumps(partial, indent=2))
                    tqdm.write(f"{v} versions: resolve {r['many_resolve_s'] * 1e3:.0f} vs "
                               f"{r['one_resolve_s'] * 1e3:.0f} ms ({r['resolve_ratio']:.2f}x), "
                               f"pull {r['many_pull_s'] * 1e3:.0f} vs {r['one_pull_s'] * 1e3:.0f}"
                               f" ms ({r['pull_ratio']:.2f}x), publish "
                               f"{r['publish_s_median_last_10']:.2f} s (median of last 10)"
                               )  # fmt: skip
                    write_markdown(rows, out / "registry_scale.md")
    last = rows[-1]
    result = {
        "rows": rows,
        "versions_reached": last["versions"],
        "resolve_ratio": last["resolve_ratio"],
        "resolve_mlflow_ratio": last["resolve_mlflow_ratio"],
        "pull_ratio": last["pull_ratio"],
        "publish_s_median_first_10": statistics.median(publish_s[:10]),
        "publish_s_median_last_10": statistics.median(publish_s[-10:]),
        "publish_s": publish_s,
        "setup": "mlflow server --workers 1 (sqlite) + moto S3 on 127.0.0.1",
        "code": code,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "registry_scale.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "registry_scale.png")
    print(f"{last['versions']} versions vs 1: resolve {result['resolve_ratio']:.2f}x, "
          f"pull {result['pull_ratio']:.2f}x")  # fmt: skip
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
