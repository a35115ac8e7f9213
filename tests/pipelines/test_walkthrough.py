"""README "How a site pulls", run as written with the default locations: owner-init,
site init, keys site-add, `adaloc lock`, site pull, site status (real `mlflow server` + S3 and
a real Prefect server on loopback; paths and the server address substituted)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow
ADALOC = str(Path(sys.executable).with_name("adaloc"))


def readme_commands() -> list[str]:
    """The section's command lines (continuations joined; `who runs: CMD` comments too)."""
    text = (REPO / "README.md").read_text().split("## How a site pulls", 1)[1]
    block = text.split("```\n", 2)[1]
    lines, pending = [], ""
    for raw in block.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("#"):
            if "who runs: " in line:
                lines.append(line.split("who runs: ", 1)[1].strip())
            continue
        if line:
            lines.append(line.split("  #", 1)[0].strip())
    return lines


def test_readme_site_walkthrough_then_lock(tmp_path, mlflow_server, prefect_server):
    cwd = tmp_path / "work"
    cwd.mkdir()
    site_dir = tmp_path / "srv" / "site"
    tiny = {k: v for k, v in tiny_overrides(tmp_path).items()
            if k not in ("name", "tracking_uri", "artifact_location", "owner_dir")}  # fmt: skip
    # The walkthrough is about locations, not accuracy: a gate every tiny run passes, so
    # `adaloc lock` moves `production` (a signed promotion) as it does for a real model.
    tiny.update(authorized_threshold=0.0, unauthorized_margin=0.9)
    (cwd / "tiny.json").write_text(json.dumps(tiny))
    env = {**os.environ, **prefect_server.env, "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
           "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
    for var in ("ADALOC_HOME", "ADALOC_OWNER_DIR", "ADALOC_MODEL", "ADALOC_SITE_DIR"):
        env.pop(var, None)
    commands = readme_commands()
    assert [c.split()[:3] for c in commands][:3] == [
        ["adaloc", "keys", "owner-init"], ["adaloc", "site", "init"],
        ["adaloc", "keys", "site-add"],
    ]  # fmt: skip
    outputs = []
    for command in commands:
        line = command.replace("/srv/site", str(site_dir)).replace(
            "http://mlflow.internal:5000", mlflow_server.tracking_uri
        )
        args = shlex.split(line)
        if args[:2] == ["adaloc", "lock"]:
            args += ["-c", "tiny.json"]  # a small training run; every location is a default
        if args[:3] == ["adaloc", "site", "init"]:  # the owner handed over owner.pub
            shutil.copy(cwd / "runs" / "owner" / "owner.pub", cwd / "owner.pub")
        if args[:3] == ["adaloc", "keys", "site-add"]:  # the site sent site.pub
            shutil.copy(site_dir / "site.pub", cwd / "site.pub")
        proc = subprocess.run([ADALOC, *args[1:]], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append((args[:3], proc.stdout))
    assert (cwd / "runs" / "owner" / "owner.key").exists()  # the default keyring, used by all
    pulled = [out for cmd, out in outputs if cmd == ["adaloc", "site", "pull"]]
    assert pulled and "key version 1" in pulled[0], outputs
    cmd = [ADALOC, "site", "status", "--dir", str(site_dir), "--json"]
    status = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(status.stdout)["installed"]["version"] == 1, status.stdout


def test_flow_command_remote_error_is_one_line(tmp_path, prefect_server):
    """A flow whose registry is unreachable ends with one error line, no traceback, after
    the retries a transient error deserves."""
    from registry.local_servers import free_port

    env = {**os.environ, **prefect_server.env, "ADALOC_HOME": str(tmp_path / "home"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([ADALOC, "evaluate", "1", "-s", f"tracking_uri={dead}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "unavailable" in last, proc.stderr[-2000:]
    assert proc.stderr.count("Retry") >= 1 or "retry" in proc.stderr.lower(), proc.stderr[-2000:]
