"""A throwaway PostgreSQL server on 127.0.0.1 for tests: `initdb` into a temp dir, then
`postgres` in its own process group, stopped (and the dir removed) at exit.

The server refuses to run as root, so when the tests run as root (CI, these machines) the
cluster belongs to the ``postgres`` user (`runuser -u postgres --`). The binaries come from
Debian's `postgresql-15` (`/usr/lib/postgresql/15/bin`; `scripts/setup.sh` installs it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from registry.local_servers import free_port, stop_process_group

PG_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL binaries (initdb, postgres) are not installed on this machine."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server: host, port, superuser and an SQLAlchemy URI builder."""

    host: str
    port: int
    user: str
    log: Path

    def uri(self, database: str) -> str:
        """``postgresql+psycopg://`` URI of ``database`` on this server (what MLflow takes)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; return its URI."""
        import psycopg

        dsn = f"host={self.host} port={self.port} user={self.user} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


def pg_bindir() -> Path:
    """Folder holding initdb/postgres: ``pg_config --bindir`` or the newest Debian cluster."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if found:
        return Path(found[-1]).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    raise PostgresUnavailable(
        "initdb not found (looked in /usr/lib/postgresql/*/bin and PATH); "
        "install it with `apt-get install -y postgresql-15` (scripts/setup.sh does as root)"
    )


def _major(path: str) -> int:
    part = Path(path).parents[1].name
    return int(part) if part.isdigit() else 0


def _as_pg(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as the postgres user when we are root (postgres refuses root)."""
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _wait_ready(bindir: Path, host: str, port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        ready = subprocess.run(
            [str(bindir / "pg_isready"), "-h", host, "-p", str(port), "-q"], check=False
        )
        if ready.returncode == 0:
            return
        time.sleep(0.25)
    raise RuntimeError(f"postgres not ready on {host}:{port} in 60 s:\n{log.read_text()[-2000:]}")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb + postgres on a free 127.0.0.1 port (trust auth on loopback only)."""
    bindir = pg_bindir()
    # Not under pytest's tmp_path: that is root's 0700 tree, which postgres cannot enter.
    root = Path(tempfile.mkdtemp(prefix="adaloc-pg-"))
    data, sock, log = root / "data", root / "sock", root / "postgres.log"
    try:
        if os.geteuid() == 0:
            pg = pwd.getpwnam(PG_USER)
            for d in (root, sock):
                d.mkdir(exist_ok=True)
                os.chown(d, pg.pw_uid, pg.pw_gid)
            log.touch()
            os.chown(log, pg.pw_uid, pg.pw_gid)
        else:
            sock.mkdir()
        user = PG_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        subprocess.run(
            _as_pg([str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust",
                    "-E", "UTF8", "--no-sync"]),
            check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        port = free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                _as_pg([str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                        "-p", str(port), "-k", str(sock), "-c", "fsync=off"]),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            _wait_ready(bindir, "127.0.0.1", port, proc, log)
            yield PostgresServer("127.0.0.1", port, user, log)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (postgres' fast shutdown) to the whole group, SIGKILL if it lingers."""
    stop_process_group(proc, grace_s=30, signum=signal.SIGINT)
