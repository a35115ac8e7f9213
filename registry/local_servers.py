"""Loopback servers for tests, benchmarks and demos: a moto S3 endpoint and `mlflow server`.

Both bind 127.0.0.1 on a free port and are context managers that always stop what they
started. Nothing here runs at import time; moto is imported only when an endpoint starts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, *, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200, ``proc`` exits, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.25) + 1):  # bounded in count as well as in time
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready within {timeout_s:.0f}s")


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 endpoint and a bucket that exists on it."""

    url: str
    bucket: str

    def client(self):
        """A boto3 S3 client for this endpoint (credentials from the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")


@contextmanager
def moto_s3(bucket: str = "adaloc") -> Iterator[S3Endpoint]:
    """moto's ThreadedMotoServer on 127.0.0.1; sets MLFLOW_S3_ENDPOINT_URL + dummy creds."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 request
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*DUMMY_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL"]}
    os.environ.update({**DUMMY_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": url})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = S3Endpoint(url, bucket)
        endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server`: its tracking URI, artifact destination and log file."""

    tracking_uri: str
    artifacts_destination: str
    log: Path


@contextmanager
def mlflow_server(
    root: str | Path, *, s3: S3Endpoint | None = None, timeout_s: float = 240.0
) -> Iterator[MlflowServer]:
    """`mlflow server --workers 1` (sqlite under ``root``; artifacts on ``s3`` or in ``root``).

    Runs in its own session so the whole process group is stopped at exit.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    destination = f"s3://{s3.bucket}/mlartifacts" if s3 else (root / "artifacts").as_uri()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", destination,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # No background job runner: the registry needs none, and it is one process fewer.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3:
        env.update({**DUMMY_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": s3.url})
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http_ok(f"{url}/health", timeout_s=timeout_s, proc=proc)
        except RuntimeError as err:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{err}\n--- mlflow server log ---\n{tail}") from err
        yield MlflowServer(url, destination, log)
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, *, grace_s: float = 15.0) -> None:
    """SIGTERM ``proc``'s process group, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
