"""`prefect deploy --all` routes `lock` to the GPU pool and the rest to the CPU pool; a
process worker on the CPU pool, started in an empty folder with no path to this checkout,
runs the `retrain` deployment from a git clone (the pull step) through a real Prefect server
on loopback: a new DVC data version publishes v2, a second run publishes nothing."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.data_version import data_version, dvc
from tests.pipelines.conftest import (
    PREFECT,
    REPO,
    _start,
    _stop_group,
    copy_data,
    make_owner_and_site,
    tiny_overrides,
)

pytestmark = pytest.mark.slow


def _pools() -> dict[str, str]:
    """Deployment name -> work pool name, as prefect.yaml routes them."""
    import yaml

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d["work_pool"]["name"] for d in doc["deployments"]}


@pytest.fixture()
def cpu_worker(prefect_server, tmp_path):
    """A process worker on the CPU pool in a folder that never saw this checkout: flow runs
    import the code the pull step cloned (no PYTHONPATH to this tree)."""
    pools = set(_pools().values())
    for pool in sorted(pools):
        prefect_server.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
    folder = tmp_path / "worker-b"
    folder.mkdir()
    env = {k: v for k, v in prefect_server.env.items() if k != "PYTHONPATH"}
    log = folder.parent / "worker-b.log"
    proc = _start([PREFECT, "worker", "start", "--pool", _pools()["adaloc-retrain"]], env, log,
                  folder)  # fmt: skip
    try:
        yield log
    finally:
        _stop_group(proc)


def test_pools_route_full_training_to_gpu_and_the_rest_to_cpu():
    pools = _pools()
    assert pools["adaloc-lock"] == "adaloc-gpu"
    assert {pools[n] for n in ("adaloc-update", "adaloc-evaluate", "adaloc-retrain")} == {
        "adaloc-cpu"
    }


def test_retrain_deployment_publishes_only_on_new_data(tmp_path, prefect_server, cpu_worker):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.flows.lock import lock_flow
    from registry import KeyRegistry

    project = tmp_path / "project"
    data = copy_data(project)
    dvc("init", "--no-scm", cwd=project)
    dvc("add", "data", cwd=project)
    first = data_version(project / "data.dvc")
    ov = tiny_overrides(
        tmp_path, name="sched", data_root=str(data), dvc_file=str(project / "data.dvc")
    )
    make_owner_and_site(tmp_path, ov)
    config_path = tmp_path / "retrain.json"
    config_path.write_text(json.dumps(ov))
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        lock_flow(config_path=str(config_path), progress=False)

    # what workers clone: this checkout's committed HEAD (file:// stands in for a git host)
    prefect_server.env["ADALOC_GIT_REPO"] = f"file://{REPO}"
    deployed = prefect_server.cli("deploy", "--all")
    assert "adaloc-retrain" in deployed
    listed = prefect_server.cli("deployment", "ls")
    assert all(f"adaloc-{n}" in listed for n in ("lock", "update", "evaluate", "retrain"))
    inspected = prefect_server.cli("deployment", "inspect", "retrain/adaloc-retrain")
    assert "0 3 * * *" in inspected
    assert "'work_pool_name': 'adaloc-cpu'" in inspected and "git_clone" in inspected
    assert f"file://{REPO}" in inspected
    lock_inspected = prefect_server.cli("deployment", "inspect", "lock/adaloc-lock")
    assert "'work_pool_name': 'adaloc-gpu'" in lock_inspected

    (data / "fashion-mnist" / "NEW-DROP.txt").write_text("a new data drop\n")
    dvc("add", "data", cwd=project)
    second = data_version(project / "data.dvc")
    assert second != first

    def run_retrain() -> str:
        return prefect_server.cli(
            "deployment",
            "run",
            "retrain/adaloc-retrain",
            "--params",
            json.dumps({"config_path": str(config_path)}),
            "--watch",
            "--watch-timeout",
            "420",
            timeout=480,
        )

    out = run_retrain()
    assert "Completed" in out, out
    # The entrypoint path is relative: it exists only in the clone the pull step made (the
    # worker's own folder is empty and this checkout is not on its path).
    assert not os.listdir(cpu_worker.parent / "worker-b"), "the worker wrote to its folder"
    assert "Deployment step 'git_clone' completed successfully" in cpu_worker.read_text()
    reg = KeyRegistry(ov["tracking_uri"], "sched")
    history = reg.history()
    assert [kv.version for kv in history] == [1, 2]
    assert history[0].data_version == first and history[1].data_version == second
    assert len(reg.bases()) == 1

    out = run_retrain()  # same data version: nothing new to publish
    assert "Completed" in out, out
    assert [kv.version for kv in reg.history()] == [1, 2]
    assert len(reg.client.search_model_versions("name='sched-key'")) == 2
