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
from contextlib import contextmanager, suppress
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
def moto_s3(bucket: str = "adaloc", *, process: bool = False) -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1; sets MLFLOW_S3_ENDPOINT_URL + dummy creds.

    Default: moto's ThreadedMotoServer in this process (fast to start: tests). ``process``:
    ``python -m moto.server`` in its own process group, as an S3 endpoint is to its
    clients; a benchmark timing a client wants that, because a server thread in the
    client's process shares its GIL and adds its request handling to every client step.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*DUMMY_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL"]}
    os.environ.update({**DUMMY_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": url})
    proc = server = None
    try:
        if process:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip
            wait_http_ok(f"{url}/moto-api/", timeout_s=60, proc=proc)
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
        endpoint = S3Endpoint(url, bucket)
        endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        if server is not None:
            server.stop()
        if proc is not None:
            stop_process_group(proc)
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
    root: str | Path,
    *,
    s3: S3Endpoint | None = None,
    s3_url: str | None = None,
    backend_store_uri: str | None = None,
    timeout_s: float = 240.0,
    port: int | None = None,
) -> Iterator[MlflowServer]:
    """`mlflow server --workers 1` (sqlite under ``root``; artifacts on ``s3`` or in ``root``).

    ``s3_url`` overrides the S3 endpoint the server (and the presigned download URLs it hands
    to clients) uses, e.g. a :func:`shaped_link` in front of ``s3``. Several servers may
    share one ``root`` (the same store). ``backend_store_uri`` replaces the sqlite file
    (e.g. ``postgresql+psycopg://...``). Runs in its own session so the whole process group
    is stopped at exit.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()  # a fixed port lets a test restart "the same" server
    destination = f"s3://{s3.bucket}/mlartifacts" if s3 else (root / "artifacts").as_uri()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", destination,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # No background job runner: the registry needs none, and it is one process fewer.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3:
        env.update({**DUMMY_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_url or s3.url})
    log = root / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _LIVE.add(proc)
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
        _LIVE.discard(proc)


_LIVE: set[subprocess.Popen] = set()  # mlflow servers started here and not yet stopped


def stop_all_servers(*, grace_s: float = 5.0) -> None:
    """Stop the process group of every :func:`mlflow_server` still running: for a signal
    handler, where unwinding the ``with`` blocks from an arbitrary point can deadlock."""
    for proc in list(_LIVE):
        stop_process_group(proc, grace_s=grace_s)
        _LIVE.discard(proc)


def stop_process_group(
    proc: subprocess.Popen, *, grace_s: float = 15.0, signum: int = signal.SIGTERM
) -> None:
    """``signum`` (SIGTERM) to ``proc``'s process group, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signum)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- shaped link
@dataclass
class LinkStats:
    """Bytes carried by a :func:`shaped_link`, per direction."""

    to_server: int = 0
    to_client: int = 0


class ShapedLink:
    """A running link emulator: ``url`` reaches the target through it (see shaped_link)."""

    def __init__(self, url: str, mbit: float | None, rtt_ms: float):
        self.url, self.stats = url, LinkStats()
        self.shape(mbit, rtt_ms)

    def shape(self, mbit: float | None, rtt_ms: float = 0.0) -> None:
        """Change the rate (Mbit/s per direction, None = unlimited) and round-trip time."""
        if mbit is not None and not mbit > 0:
            raise ValueError(f"mbit={mbit!r}; expected a positive rate or None")
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms={rtt_ms!r}; expected >= 0")
        self.mbit, self.rtt_ms = mbit, float(rtt_ms)
        self.bytes_per_s = None if mbit is None else mbit * 1e6 / 8
        self.free_at = {"to_server": 0.0, "to_client": 0.0}  # loop time the wire is free

    def departure(self, direction: str, now: float, n: int) -> float:
        """When ``n`` bytes handed over at ``now`` have left (one wire per direction)."""
        if self.bytes_per_s is None:
            return now
        self.free_at[direction] = max(now, self.free_at[direction]) + n / self.bytes_per_s
        return self.free_at[direction]


@contextmanager
def shaped_link(
    target: str, *, mbit: float | None = None, rtt_ms: float = 0.0, chunk: int = 16384
) -> Iterator[ShapedLink]:
    """A TCP proxy on 127.0.0.1 that behaves like a link of ``mbit`` Mbit/s and ``rtt_ms``.

    ``target`` is ``http://host:port``. Each direction is paced at ``mbit`` (shared by all
    connections, like one access link; None = unlimited) and every chunk arrives
    ``rtt_ms / 2`` after it left, in order. ``link.shape()`` changes both while it runs.
    It stands in for ``tc netem`` without root, so benchmarks can compare transfers over a
    realistic link instead of loopback.
    """
    import asyncio
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(target)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    listen_port = free_port()
    link = ShapedLink(f"http://127.0.0.1:{listen_port}", mbit, rtt_ms)
    loop = asyncio.new_event_loop()

    async def pipe(reader, writer, direction: str) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, data = item
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(chunk):
                setattr(link.stats, direction, getattr(link.stats, direction) + len(data))
                left = link.departure(direction, loop.time(), len(data))
                await queue.put((left + link.rtt_ms / 2000.0, data))
                # Back-pressure: don't read far ahead of what the wire has sent.
                ahead = left - loop.time()
                if ahead > 0.05:
                    await asyncio.sleep(ahead - 0.05)
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put(None)
            with suppress(ConnectionError, OSError):
                await sender

    async def handle(client_r, client_w) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(
                pipe(client_r, server_w, "to_server"), pipe(server_r, client_w, "to_client")
            )
        except asyncio.CancelledError:
            pass  # the link is shutting down with a keep-alive connection still open
        finally:
            for w in (server_w, client_w):
                w.close()

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", listen_port))
    thread = threading.Thread(target=loop.run_forever, name="shaped-link", daemon=True)
    thread.start()
    try:
        yield link
    finally:

        async def shutdown() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
