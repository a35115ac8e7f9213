"""A run killed mid-flow and re-run leaves no half-visible version and completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipelines.conftest import REPO, make_owner_and_site, tiny_overrides

pytestmark = pytest.mark.slow
ADALOC = str(Path(sys.executable).with_name("adaloc"))


@pytest.fixture()
def locked(tmp_path, prefect_api):
    """A published base + key v1 and a config file for later runs."""
    from pipelines.flows.lock import lock_flow
    from registry import KeyRegistry

    ov = tiny_overrides(tmp_path, name="crash", key_epochs=4, train_limit=6000)
    make_owner_and_site(tmp_path, ov)
    lock_flow(overrides=ov, progress=False)
    path = tmp_path / "crash.json"
    path.write_text(json.dumps(ov))
    return {"ov": ov, "config": path, "registry": KeyRegistry(ov["tracking_uri"], "crash")}


def _versions(reg) -> list[tuple[int, str]]:
    return sorted(
        (mv.version, mv.tags.get("status", ""))
        for mv in reg.client.search_model_versions("name='crash-key'")
    )


def test_update_killed_during_training_then_rerun(locked, prefect_server):
    reg = locked["registry"]
    proc = subprocess.Popen(
        [ADALOC, "update", "-c", str(locked["config"])],
        cwd=REPO,
        env=prefect_server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen, deadline = b"", time.monotonic() + 240
    try:
        while b"key-only v2" not in seen and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        assert b"key-only v2" in seen, seen.decode(errors="replace")[-3000:]
        time.sleep(1.0)  # well inside training
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert [kv.version for kv in reg.history()] == [1]
    assert _versions(reg) == [(1, "ready")]

    rerun = subprocess.run(
        [ADALOC, "update", "-c", str(locked["config"])],
        cwd=REPO,
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert [kv.version for kv in reg.history()] == [1, 2]
    assert reg.verify(2, owner_public_pem=_owner_pub(locked))["ok"]


def test_update_crashed_between_publish_steps_then_rerun(locked, monkeypatch):
    """The process dies after the sealed key is stored and the version registered, before
    it is marked ready: readers never see it; the re-run finishes the same publication."""
    from pipelines.flows.update import update_flow
    from registry.store import KeyRegistry

    reg, real = locked["registry"], KeyRegistry._mark_ready

    def crash(self, name, mv, run_id):
        if name.endswith("-key"):
            raise KeyboardInterrupt("simulated kill between publish steps")
        return real(self, name, mv, run_id)

    monkeypatch.setattr(KeyRegistry, "_mark_ready", crash)
    with pytest.raises(BaseException):  # noqa: B017 - whatever the crash surfaces as
        update_flow(overrides=locked["ov"], progress=False)
    assert [kv.version for kv in reg.history()] == [1]
    assert (2, "pending") in _versions(reg)  # registered but not visible to readers

    monkeypatch.setattr(KeyRegistry, "_mark_ready", real)
    update_flow(overrides=locked["ov"], progress=False)
    assert [kv.version for kv in reg.history()] == [1, 2]
    assert reg.verify(2, owner_public_pem=_owner_pub(locked))["ok"]
    assert reg.resolve("candidate").version == 2


def _owner_pub(locked) -> bytes:
    return (Path(locked["ov"]["owner_dir"]) / "owner.pub").read_bytes()
