"""Issues 4 and 16: a key-version update vs a full model download, from the same server.

For each model (ResNet-18-sized and the small default CNN; random weights: bytes and time are
what count) the owner locks it, publishes the base once and key versions 1..N+1, and also
logs the full authorized model as a run artifact. Then, from the same MLflow server (+ S3):

- key update, ready to serve: ``Site.pull("production")`` (signed records, sealed key
  download, signature, decrypt, install of the small key file) and then the module the
  model answers with: "cold" = a fresh Site and ``registry.loader.load_model`` (base read
  from the site's disk cache), "warm" = a long-lived site and ``registry.loader.swap_key``
  (base in memory, only the keyed tensors written; what ``adaloc serve`` does).
- full model: resolve alias + download model.safetensors + build network + load_state_dict.

Both are measured over each link in ``--links``: plain loopback, and links of a given rate and
round-trip time emulated by a pacing TCP proxy in front of the server (both directions paced,
shared by all connections, like one access link), because loopback moves 45 MB in a fraction
of a second and no deployment site sits on the server's loopback. The physical bound of the
speed-up is the byte ratio (full bytes / update bytes), reported beside it. Last, a real
``adaloc serve`` on the site hot-swaps ``--serve-swaps`` versions: swap seconds (keyed
tensors built and switched in) and the server's peak extra resident memory.

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
from dataclasses import dataclass
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
    p.add_argument(
        "--links",
        default="loopback,1000:2,100:20,50:30,20:40",
        help="links between site and server: loopback (no proxy) or MBIT[:RTT_MS], emulated "
        "by a pacing TCP proxy on 127.0.0.1 (registry.local_servers.shaped_link)",
    )
    p.add_argument("--serve-swaps", type=int, default=3,
                   help="hot swaps timed inside a running `adaloc serve` (0 = skip)")  # fmt: skip
    p.add_argument("--s3", choices=("process", "thread"), default="process",
                   help="moto S3 in its own process (like a real endpoint) or as a thread of "
                   "this one, sharing the client's GIL")  # fmt: skip
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
                        metrics={"bench": 1.0}, gate=True)  # fmt: skip
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


def parse_links(text: str) -> list[dict]:
    """``loopback,1000:5,100:20`` -> links (Mbit/s and round-trip ms; loopback = no proxy)."""
    links = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == "loopback":
            links.append({"name": "loopback", "mbit": None, "rtt_ms": 0.0})
            continue
        mbit, _, rtt = item.partition(":")
        try:
            link = {"mbit": float(mbit), "rtt_ms": float(rtt or 0)}
        except ValueError:
            raise SystemExit(f"error: link {item!r}; expected loopback or MBIT[:RTT_MS]") from None
        links.append({"name": f"{link['mbit']:g}Mbit/s rtt {link['rtt_ms']:g}ms", **link})
    if not links:
        raise SystemExit("error: --links is empty")
    return links


@dataclass
class Servers:
    """Where the site and the full download reach the registry.

    ``direct``: an mlflow server whose presigned download URLs point straight at the S3
    endpoint (loopback). ``shaped``: the REST link in front of a second server on the same
    store whose S3 endpoint is itself behind ``s3_link``, so every byte a client moves (REST
    and presigned S3 downloads) crosses an emulated link.
    """

    direct: str
    api_link: object | None = None
    s3_link: object | None = None


@contextlib.contextmanager
def _through(link: dict, servers: Servers):
    """(url, bytes_received) reaching the registry over ``link``."""
    if link["mbit"] is None:
        yield servers.direct, None
        return
    if servers.api_link is None:
        raise SystemExit("error: shaped links need the bench's own servers (no --tracking-uri)")
    shaped = (servers.api_link, servers.s3_link)
    for s in shaped:
        s.shape(link["mbit"], link["rtt_ms"])
    try:
        yield servers.api_link.url, lambda: sum(s.stats.to_client for s in shaped)
    finally:
        for s in shaped:
            s.shape(None, 0.0)  # the owner publishes at full speed (untimed)


class RequestCount:
    """HTTP requests this process sends (every MLflow REST call and artifact download goes
    through ``requests``), counted by wrapping its adapter: a measurement, not a change."""

    def __init__(self) -> None:
        import threading

        import requests.adapters

        self.n, self._lock = 0, threading.Lock()
        adapter, original = requests.adapters.HTTPAdapter, requests.adapters.HTTPAdapter.send

        def send(inner, request, **kw):
            with self._lock:
                self.n += 1
            return original(inner, request, **kw)

        adapter.send = send


def _full_download(name: str, full_name: str, tracking_uri: str) -> tuple[float, int, str]:
    """Resolve the full model's alias, download it from the server, load it into a network."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mv = client.get_model_version_by_alias(full_name, "production")
        path = mlflow.artifacts.download_artifacts(
            f"{mv.source}/model.safetensors", dst_path=tmp, tracking_uri=tracking_uri
        )
        model = build_model(name, **MODELS[name])
        model.load_state_dict(load_file(path))
        seconds = time.perf_counter() - t
        return seconds, os.path.getsize(path), state_sha256(model)


def _server_rtt(tracking_uri: str, n: int = 7) -> float:
    """Median seconds of one small REST call (experiment by name): the machine's and the
    server's own latency, which bounds an update that needs a few of them in a row."""
    from mlflow import MlflowClient

    client, out = MlflowClient(tracking_uri), []
    for _ in range(n):
        t = time.perf_counter()
        client.get_experiment_by_name("Default")
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _url_ttl() -> int:
    from mlflow.environment_variables import MLFLOW_PRESIGNED_DOWNLOAD_URL_TTL_SECONDS

    return MLFLOW_PRESIGNED_DOWNLOAD_URL_TTL_SECONDS.get()


def _ready_sha(served) -> str:
    """sha256 of the state a served module answers with (checked untimed)."""
    return state_sha256(served.model.state_dict())


def bench_model(name: str, servers: Servers, work: Path, args) -> list[dict]:
    """Key updates (cold and warm) vs full downloads for one model, over each link.

    An update is ready to serve when it ends: cold = a fresh ``Site`` pulls, then
    ``registry.loader.load_model`` builds the module from the cached base + the new key (a
    process that starts after the pull); warm = a long-lived site pulls, then
    ``registry.loader.swap_key`` writes the keyed tensors around the base already in memory
    (what ``adaloc serve`` does).
    """
    from registry.keyring import OwnerKeyring
    from registry.loader import load_model, swap_key
    from registry.site import Site
    from registry.store import KeyRegistry

    # A fresh name per run: a given (shared) server may hold earlier bench runs.
    server_uri = servers.direct
    reg = KeyRegistry(server_uri, f"bench-{name}-{int(time.time())}")
    owner = OwnerKeyring.init(work / "owner")
    site_dir = work / "site"
    site = Site.init(
        site_dir,
        site_id="bench",
        tracking_uri=server_uri,
        model_name=reg.model_name,
        owner_public_pem=owner.owner_public_pem,
    )
    owner.add_site("bench", site.public_key_pem)
    n, links = args.repeats, parse_links(args.links)
    requests_made = RequestCount()
    versions = 1 + (2 * n + 2) * len(links) + args.serve_swaps
    info = _owner_side(name, reg, owner, work, args.budget, versions)
    reg.promote(1, owner=owner)
    first = site.pull("production")  # downloads and caches the base: once per site
    info["server_rtt_s"] = _server_rtt(server_uri)
    served = load_model(site, device="cpu")
    rows, version = [], 2
    for link in links:
        with _through(link, servers) as (url, received):
            site.set_tracking_uri(url)
            # Untimed warm-up: two polls of the long-lived site over this link (the second
            # knows its trust run, so it asks for the head's key copy and keeps that URL,
            # renewed in the background past half its life), connection set-up, imports.
            for _ in range(2):
                reg.promote(version, owner=owner)
                served = swap_key(served, site, pulled=site.pull("production"))
                version += 1
            cold, warm, wire_key, apply_s = [], [], [], {"cold": [], "warm": []}
            phases: dict = {"cold": {}, "warm": {}}
            calls = {"cold": [], "warm": []}
            for mode in ("cold", "warm"):
                for _ in range(n):
                    reg.promote(version, owner=owner)  # owner action, untimed
                    before = received() if received else 0
                    calls0 = requests_made.n
                    t = time.perf_counter()
                    if mode == "cold":  # like a CLI pull, then a process that loads it
                        r = Site(site_dir).pull("production")
                        t_apply = time.perf_counter()
                        ready = load_model(site_dir, device="cpu", verify=False)
                    else:  # a running server: base in memory, keyed tensors swapped in
                        r = site.pull("production")
                        t_apply = time.perf_counter()
                        ready = served = swap_key(served, site, pulled=r)
                    done = time.perf_counter()
                    calls[mode].append(requests_made.n - calls0)
                    (cold if mode == "cold" else warm).append(done - t)
                    apply_s[mode].append(done - t_apply)
                    wire_key.append(received() - before if received else None)
                    assert ready.version == version, (ready.version, version)
                    assert _ready_sha(ready) == info["shas"][version], "served model differs"
                    phases[mode] = r.seconds
                    key_bytes = r.bytes_key + r.bytes_base
                    version += 1
            full, wire_full, full_calls = [], [], []
            for _ in range(n):
                before, calls0 = (received() if received else 0), requests_made.n
                full.append(_full_download(name, info["full_name"], url))
                full_calls.append(requests_made.n - calls0)
                wire_full.append(received() - before if received else None)
        assert all(sha == info["full_sha"] for _, _, sha in full)
        full_s, full_bytes = statistics.median(s for s, _, _ in full), full[0][1]
        cold_s, warm_s = statistics.median(cold), statistics.median(warm)
        rows.append(
            {
                "model": name,
                "link": link,
                "params": info["params"],
                "key_params": info["key_params"],
                "base_bytes_first_pull": first.bytes_base,
                "update_bytes": key_bytes,
                "full_bytes": full_bytes,
                "update_bytes_pct_of_full": 100 * key_bytes / full_bytes,
                "byte_ratio_bound": full_bytes / key_bytes,
                # Everything that crossed the link (HTTP + REST calls), when shaped.
                "update_wire_bytes": None if wire_key[0] is None else max(wire_key),
                "full_wire_bytes": None if wire_full[0] is None else max(wire_full),
                "pull_cold_s": cold_s,
                "pull_warm_s": warm_s,
                "apply_cold_s": statistics.median(apply_s["cold"]),
                "apply_warm_s": statistics.median(apply_s["warm"]),
                "full_download_load_s": full_s,
                "speedup_cold": full_s / cold_s,
                "speedup_warm": full_s / warm_s,
                "pull_phases_s": phases["cold"],
                "pull_phases_warm_s": phases["warm"],
                # A long-lived site reuses presigned URLs of fixed-path files (timestamp, a
                # head's key copy), renewed in the background past half the server's TTL.
                "presigned_url_ttl_s": _url_ttl(),
                "server_rest_call_s": info["server_rtt_s"],
                "requests_per_update": {"cold": max(calls["cold"]), "warm": max(calls["warm"])},
                "requests_per_full_download": max(full_calls),
                "runs": {"cold": cold, "warm": warm, "full": [s for s, _, _ in full]},
            }
        )
        print(
            f"{name} over {link['name']}: cold {cold_s:.3f} s, warm {warm_s:.3f} s, "
            f"full {full_s:.3f} s -> {full_s / cold_s:.1f}x / {full_s / warm_s:.1f}x "
            f"(bytes {full_bytes / key_bytes:.1f}x)",
            flush=True,
        )
    if args.serve_swaps:
        site.set_tracking_uri(servers.direct)
        rows[-1]["server_swap"] = serve_swap(reg, owner, site_dir, version, args.serve_swaps)
    return rows


def serve_swap(reg, owner, site_dir: Path, version: int, swaps: int) -> dict:
    """Inside a running `adaloc serve`: seconds of each hot swap (keyed tensors built and
    switched in, after the pull) and the server's peak extra resident memory during it."""
    import signal
    import subprocess
    import sys
    import threading

    import httpx
    import psutil

    from registry.local_servers import free_port, wait_http_ok

    port = free_port()
    adaloc = str(Path(sys.executable).with_name("adaloc"))
    cmd = [adaloc, "serve", "--dir", str(site_dir), "--port", str(port), "--poll", "0"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url, out = f"http://127.0.0.1:{port}", []
    try:
        t_start = time.perf_counter()
        wait_http_ok(f"{url}/healthz", timeout_s=300, proc=proc)
        healthy_s = time.perf_counter() - t_start
        # Updates reach a server minutes after its start, when the background import of the
        # pull path is long done; wait for it (bounded) so swap 1 is timed as such a swap is.
        deadline = time.monotonic() + 120
        while not httpx.get(f"{url}/version", timeout=30).json().get("pull_path_ready"):
            if time.monotonic() > deadline:
                raise SystemExit("error: adaloc serve did not warm its pull path in 120 s")
            time.sleep(0.05)
        warm_s = time.perf_counter() - t_start
        print(f"adaloc serve: healthy after {healthy_s:.2f} s, pull path imported after "
              f"{warm_s:.2f} s", flush=True)  # fmt: skip
        ps = psutil.Process(proc.pid)
        for v in range(version, version + swaps):
            reg.promote(v, owner=owner)
            rss0, peak, stop = ps.memory_info().rss, [0], threading.Event()

            def sample(peak=peak, stop=stop):
                while not stop.is_set():
                    peak[0] = max(peak[0], ps.memory_info().rss)
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t = time.perf_counter()
            r = httpx.post(f"{url}/admin/pull", timeout=300)
            wall = time.perf_counter() - t
            stop.set()
            sampler.join()
            assert r.status_code == 200 and r.json()["key_version"] == v, r.text
            swap = httpx.get(f"{url}/version", timeout=30).json()["last_swap"]
            out.append({"version": v, "swap_s": swap["seconds"], "pull_s": swap["pull_seconds"],
                        "admin_pull_wall_s": wall, "keyed_bytes": swap["keyed_bytes"],
                        "rss_before": rss0, "rss_peak_extra": max(peak[0], rss0) - rss0,
                        "rss_after_extra": ps.memory_info().rss - rss0})  # fmt: skip
            print(f"server swap to v{v}: swap {swap['seconds'] * 1e3:.1f} ms, pull "
                  f"{swap['pull_seconds'] * 1e3:.0f} ms, keyed tensors {swap['keyed_bytes']:,} B, "
                  f"peak extra RSS {out[-1]['rss_peak_extra']:,} B", flush=True)  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    med = statistics.median
    return {"swaps": out, "healthy_after_s": healthy_s, "pull_path_ready_after_s": warm_s,
            "swap_s_median": med(o["swap_s"] for o in out),
            "pull_s_median": med(o["pull_s"] for o in out),
            "keyed_bytes": out[-1]["keyed_bytes"],
            "rss_peak_extra_median": med(o["rss_peak_extra"] for o in out)}  # fmt: skip


def _print_table(rows: list[dict]) -> None:
    head = ["model", "link", "update B", "full B", "update %", "pull cold s", "pull warm s",
            "full s", "x cold", "x warm", "x bytes"]  # fmt: skip
    print(" | ".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = [r["model"], r["link"]["name"], r["update_bytes"], r["full_bytes"],
                 f"{r['update_bytes_pct_of_full']:.2f}", f"{r['pull_cold_s']:.3f}",
                 f"{r['pull_warm_s']:.3f}", f"{r['full_download_load_s']:.3f}",
                 f"{r['speedup_cold']:.1f}", f"{r['speedup_warm']:.1f}",
                 f"{r['byte_ratio_bound']:.1f}"]  # fmt: skip
        print(" | ".join(f"{c:>11}" for c in cells))


def main(args) -> dict:
    """Run the benchmark (starting a loopback mlflow server + S3 unless given one)."""
    from registry.local_servers import mlflow_server, moto_s3, shaped_link

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    torch.set_num_threads(1)  # a shared machine: ratios side by side, not peak throughput
    links = parse_links(args.links)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        if args.tracking_uri:
            servers, setup = Servers(args.tracking_uri), "given server"
        else:
            s3 = stack.enter_context(moto_s3("bench", process=args.s3 == "process"))
            direct = stack.enter_context(mlflow_server(work / "server", s3=s3))
            servers = Servers(direct.tracking_uri)
            setup = f"mlflow server --workers 1 (sqlite) + moto S3 ({args.s3}) on 127.0.0.1"
            if any(link["mbit"] is not None for link in links):
                servers.s3_link = stack.enter_context(shaped_link(s3.url))
                second = mlflow_server(work / "server", s3=s3, s3_url=servers.s3_link.url)
                servers.api_link = stack.enter_context(
                    shaped_link(stack.enter_context(second).tracking_uri)
                )
                setup += "; shaped rows: a second server on the same store, REST and S3 each "
                setup += "behind a pacing proxy (registry.local_servers.shaped_link)"
        rows = [r for m in args.models.split(",") for r in bench_model(m, servers, work / m, args)]
    result = {"setup": setup, "repeats": args.repeats, "budget": args.budget, "rows": rows,
              "links": args.links, "cpu_count": os.cpu_count(),
              "load_avg": os.getloadavg()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print_table(rows)
    from pull_vs_full_report import plot, write_markdown

    write_markdown(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
