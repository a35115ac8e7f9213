"""Issue 4, point 2: a key-version update vs a full model download, from the same server.

For each model (ResNet-18-sized and the small default CNN; random weights: bytes and time are
what count) the owner locks it, publishes the base once and key versions 1..N+1, and also
logs the full authorized model as a run artifact. Then, from the same MLflow server (+ S3):

- key update: ``Site.pull("production")`` = resolve alias + download sealed key + verify
  signature + decrypt + apply the key + check the owner's sha256 + atomic model.safetensors.
  "cold" uses a fresh Site object each time (base read from the site's disk cache), "warm"
  keeps it in memory.
- full model: resolve alias + download model.safetensors + build network + load_state_dict.

    python bench/pull_vs_full.py --out runs/bench/pull_vs_full.json
    python bench/pull_vs_full.py --models cnn --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaloc.artifact import ModelCard, save_base
from adaloc.keys import KeySpec, select_key
from adaloc.lock import Key, lock, state_sha256, unlock
from adaloc.models import build_model

MODELS = {
    "resnet18": {"in_channels": 3, "num_classes": 100, "image_size": 32},
    "cnn": {"in_channels": 1, "num_classes": 10, "image_size": 28},
}


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,cnn", help="comma list of " + ",".join(MODELS))
    p.add_argument("--repeats", type=int, default=3, help="timed updates / downloads per model")
    p.add_argument("--budget", type=float, default=0.05, help="key budget (fraction of params)")
    p.add_argument("--tracking-uri", default=None, help="existing server; default: start one")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--out", default="runs/bench/pull_vs_full.json")
    return p


def _owner_side(name: str, reg, owner, work: Path, budget: float, versions: int) -> dict:
    """Lock a random-weight model; publish base, key versions and the full model."""
    torch.manual_seed(0)
    kwargs = MODELS[name]
    model = build_model(name, **kwargs)
    spec = KeySpec(budget=budget)
    base, key = lock(model, select_key(model, spec))
    shape = [kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]]
    card = ModelCard(name, dict(kwargs), kwargs["num_classes"], shape, spec.to_dict())
    saved = save_base(base, card, work / "base")
    reg.publish_base(work / "base", base_sha256=saved["sha256"])
    g, shas = torch.Generator().manual_seed(1), {}
    for v in range(1, versions + 1):
        if v > 1:  # a key-only update: only the values at the key positions change
            values = {
                n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in key.values.items()
            }
            key = Key(key.mask, values, key.base_sha256, version=v, parent=v - 1)
        shas[v] = state_sha256(unlock(base, key))
        reg.publish_key(key, owner=owner, model_sha256=shas[v], key_spec=spec.to_dict(),
                        metrics={"bench": 1.0})  # fmt: skip
    full = unlock(base, key)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, work / "model.safetensors")
    # The baseline: the full authorized model as a registered model with an alias, so both
    # paths start from the same "resolve production" request.
    run = reg.client.create_run(reg._experiment(), run_name=f"full-{name}")
    reg.client.log_artifact(run.info.run_id, str(work / "model.safetensors"), "full")
    full_name = f"{reg.model_name}-full"
    reg.client.create_registered_model(full_name)
    mv = reg.client.create_model_version(
        full_name, f"{run.info.artifact_uri}/full", run_id=run.info.run_id
    )
    reg.client.set_registered_model_alias(full_name, "production", mv.version)
    params = sum(p.numel() for p in model.parameters())
    return {"shas": shas, "full_name": full_name, "base_bytes": saved["bytes"], "params": params,
            "key_params": key.numel(), "full_sha": state_sha256(full)}  # fmt: skip


def _full_download(name: str, full_name: str, reg) -> tuple[float, int, str]:
    """Resolve the full model's alias, download it from the server, load it into a network."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mv = reg.client.get_model_version_by_alias(full_name, "production")
        path = mlflow.artifacts.download_artifacts(
            f"{mv.source}/model.safetensors", dst_path=tmp, tracking_uri=reg.tracking_uri
        )
        model = build_model(name, **MODELS[name])
        model.load_state_dict(load_file(path))
        seconds = time.perf_counter() - t
        return seconds, os.path.getsize(path), state_sha256(model)


def bench_model(name: str, tracking_uri: str, work: Path, args) -> dict:
    """Measure key pulls (cold and warm) and full downloads for one model."""
    from registry.site import Site
    from registry.sites import OwnerKeyring
    from registry.store import KeyRegistry

    # A fresh name per run: a given (shared) server may hold earlier bench runs.
    reg = KeyRegistry(tracking_uri, f"bench-{name}-{int(time.time())}")
    owner = OwnerKeyring.init(work / "owner")
    site_dir = work / "site"
    site = Site.init(
        site_dir,
        site_id="bench",
        tracking_uri=tracking_uri,
        model_name=reg.model_name,
        owner_public_pem=owner.owner_public_pem,
    )
    owner.add_site("bench", site.public_key_pem)
    n = args.repeats
    info = _owner_side(name, reg, owner, work, args.budget, 1 + 2 * n)
    first = site.pull(1)  # downloads and caches the base: once per site, not per update
    cold, warm, key_bytes = [], [], []
    for v in range(2, 2 + n):
        reg.promote(v)  # owner action, not timed; the site pulls "production" like in the field
        r = Site(site_dir).pull("production")  # fresh object: base comes from the disk cache
        assert r.model_sha256 == info["shas"][v], "site model differs from the owner's"
        cold.append(r.seconds["total"])
        key_bytes.append(r.bytes_key + r.bytes_base)
    for v in range(2 + n, 2 + 2 * n):
        reg.promote(v)
        r = site.pull("production")  # long-lived site: base already in memory
        assert r.model_sha256 == info["shas"][v]
        warm.append(r.seconds["total"])
    full = [_full_download(name, info["full_name"], reg) for _ in range(n)]
    assert all(sha == info["full_sha"] for _, _, sha in full)
    full_s, full_bytes = statistics.median(s for s, _, _ in full), full[0][1]
    key_s, key_b = statistics.median(cold), max(key_bytes)
    return {
        "model": name,
        "params": info["params"],
        "key_params": info["key_params"],
        "base_bytes_first_pull": first.bytes_base,
        "update_bytes": key_b,
        "full_bytes": full_bytes,
        "update_bytes_pct_of_full": 100 * key_b / full_bytes,
        "pull_cold_s": key_s,
        "pull_warm_s": statistics.median(warm),
        "full_download_load_s": full_s,
        "speedup_cold": full_s / key_s,
        "speedup_warm": full_s / statistics.median(warm),
        "pull_phases_s": r.seconds,
        # Loopback moves 45 MB in a fraction of a second; on a real link transfer dominates.
        # Projected (not measured): measured local time + bytes at the given link speed.
        "projected_speedup_cold": {
            f"{mbps}Mbit/s": (full_s + full_bytes * 8 / (mbps * 1e6))
            / (key_s + key_b * 8 / (mbps * 1e6))
            for mbps in (100, 1000)
        },
        "runs": {"cold": cold, "warm": warm, "full": [s for s, _, _ in full]},
    }


def _print_table(rows: list[dict]) -> None:
    head = ["model", "params", "update B", "full B", "update %", "pull cold s", "pull warm s",
            "full s", "x cold", "x warm"]  # fmt: skip
    print(" | ".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = [r["model"], r["params"], r["update_bytes"], r["full_bytes"],
                 f"{r['update_bytes_pct_of_full']:.2f}", f"{r['pull_cold_s']:.3f}",
                 f"{r['pull_warm_s']:.3f}", f"{r['full_download_load_s']:.3f}",
                 f"{r['speedup_cold']:.1f}", f"{r['speedup_warm']:.1f}"]  # fmt: skip
        print(" | ".join(f"{c:>11}" for c in cells))


def main(args) -> dict:
    """Run the benchmark (starting a loopback mlflow server + S3 unless given one)."""
    from registry.local_servers import mlflow_server, moto_s3

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        uri, setup = args.tracking_uri, "given server"
        if uri is None:
            s3 = stack.enter_context(moto_s3("bench"))
            uri = stack.enter_context(mlflow_server(work / "server", s3=s3)).tracking_uri
            setup = "mlflow server --workers 1 (sqlite) + moto S3 on 127.0.0.1"
        rows = [bench_model(m, uri, work / m, args) for m in args.models.split(",")]
    result = {"setup": setup, "repeats": args.repeats, "budget": args.budget, "rows": rows,
              "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print_table(rows)
    for r in rows:
        proj = ", ".join(f"{k}: {v:.1f}x" for k, v in r["projected_speedup_cold"].items())
        print(f"{r['model']}: projected cold speedup over a real link ({proj})")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
