"""Pipeline fixtures: a real `prefect server` + process worker on loopback, a tiny config on
a Fashion-MNIST slice, and an owner with one authorized site.

Servers start once per session in their own process group and are killed as a group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.local_servers import free_port, stop_process_group, wait_http_ok

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "adaloc-process"
_START_TIMEOUT_S = 600.0  # a loaded CI machine can take minutes


@dataclass(frozen=True)
class PrefectServer:
    """A running `prefect server`: its API URL, the env that points clients at it, its log."""

    api_url: str
    env: dict
    log: Path

    def cli(self, *args: str, timeout: float = 300, cwd: Path = REPO) -> str:
        """Run ``prefect ARGS`` against this server; return stdout, fail with the output."""
        proc = subprocess.run(
            [PREFECT, "--no-prompt", *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, (
            f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        )
        return proc.stdout


def _stop_group(proc: subprocess.Popen) -> None:
    stop_process_group(proc, grace_s=20)


def _start(cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME/database."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env = {
        **base,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    }
    log = home / "server.log"
    proc = _start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log, home
    )
    try:
        api = f"http://127.0.0.1:{port}/api"
        try:
            wait_http_ok(f"{api}/health", timeout_s=_START_TIMEOUT_S, proc=proc)
        except RuntimeError as err:
            raise RuntimeError(
                f"{err}\n--- prefect server log ---\n{log.read_text()[-2000:]}"
            ) from err
        client_env = {
            **env,
            "PREFECT_API_URL": api,
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        yield PrefectServer(api, client_env, log)
    finally:
        _stop_group(proc)


@pytest.fixture()
def prefect_api(prefect_server):
    """Run in-process flows against the session's Prefect server (no ephemeral API)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


@pytest.fixture(scope="session")
def prefect_worker(prefect_server, tmp_path_factory) -> Iterator[Path]:
    """A process worker polling the `adaloc-process` pool (created first); yields its log."""
    prefect_server.cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
    log = tmp_path_factory.mktemp("prefect-worker") / "worker.log"
    proc = _start(
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
        prefect_server.env,
        log,
        REPO,
    )
    try:
        yield log
    finally:
        _stop_group(proc)


def tiny_overrides(root: Path, **extra) -> dict:
    """A config that trains in seconds: a Fashion-MNIST slice, 1 epoch, a lenient gate."""
    return {
        "name": "tiny",
        "dataset": "fashion-mnist",
        "data_root": str(REPO / "data"),
        "dvc_file": str(REPO / "data.dvc"),
        "train_limit": 3000,
        "test_limit": 1000,
        "epochs": 1,
        "key_epochs": 1,
        "updates": 2,
        "batch_size": 64,
        "device": "cpu",
        "authorized_threshold": 0.5,
        "unauthorized_margin": 0.1,
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifact_location": (root / "artifacts").as_uri(),
        "owner_dir": str(root / "owner"),
        "key": {"selection": "magnitude"},
        **extra,
    }


def make_owner_and_site(root: Path, overrides: dict):
    """Owner keyring + one authorized site at ``root/site``; returns the Site."""
    from registry import OwnerKeyring, Site

    owner = OwnerKeyring.init(overrides["owner_dir"])
    site = Site.init(
        root / "site",
        site_id="site-1",
        tracking_uri=overrides["tracking_uri"],
        model_name=overrides["name"],
        owner_public_pem=owner.owner_public_pem,
    )
    owner.add_site("site-1", site.public_key_pem)
    return site


def copy_data(dst: Path) -> Path:
    """A private DVC project holding a copy of Fashion-MNIST (so tests can change it)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "data", dst / "data", ignore=shutil.ignore_patterns(".gitignore"))
    return dst / "data"
