"""Screenshot the MLflow UI's page of the `<name>-key` versions (aliases, tags) from a demo.

    python scripts/screenshot_mlflow_ui.py --demo runs/demo --out docs/img/mlflow-key-versions.png

Serves the demo's store with `mlflow server` on a free 127.0.0.1 port (its own process
group, killed at the end) and points headless Debian `chromium` at the registered model's
page (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of the screenshot script."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo", help="the --out folder of `adaloc demo`")
    p.add_argument("--out", default="docs/img/mlflow-key-versions.png")
    p.add_argument("--page", default="key", choices=("key", "base", "experiment"))
    p.add_argument("--window-size", default="1700,1300")
    p.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the SPA")
    p.add_argument("--timeout", type=float, default=180, help="server readiness timeout (s)")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def main(args: argparse.Namespace) -> Path:
    """Serve the store, take the screenshot, stop the server; returns the PNG path."""
    summary = json.loads((Path(args.demo) / "summary.json").read_text())
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found; install it with `apt-get install -y chromium`")
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        summary["tracking_uri"],
        "--default-artifact-root",
        summary["artifact_location"],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(f"{base}/health", server, args.timeout)
        name = summary["model_name"]
        route = {
            "key": f"models/{name}-key",
            "base": f"models/{name}-base",
            "experiment": "experiments",
        }[args.page]
        with tempfile.TemporaryDirectory() as profile:
            shot = [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={args.window_size}",
                f"--virtual-time-budget={args.wait_ms}",
                f"--screenshot={out}",
                f"{base}/#/{route}",
            ]
            subprocess.run(
                shot, check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
    print(out)
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
