"""`prefect deploy --all` + a process worker run the `retrain` deployment through a real
Prefect server on loopback: a new DVC data version publishes v2, a second run publishes
nothing."""

from __future__ import annotations

import json

import pytest

from pipelines.data_version import data_version, dvc
from tests.pipelines.conftest import copy_data, make_owner_and_site, tiny_overrides

pytestmark = pytest.mark.slow


def test_retrain_deployment_publishes_only_on_new_data(tmp_path, prefect_server, prefect_worker):
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

    deployed = prefect_server.cli("deploy", "--all")
    assert "adaloc-retrain" in deployed
    listed = prefect_server.cli("deployment", "ls")
    assert all(f"adaloc-{n}" in listed for n in ("lock", "update", "evaluate", "retrain"))
    inspected = prefect_server.cli("deployment", "inspect", "retrain/adaloc-retrain")
    assert "0 3 * * *" in inspected

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
    reg = KeyRegistry(ov["tracking_uri"], "sched")
    history = reg.history()
    assert [kv.version for kv in history] == [1, 2]
    assert history[0].data_version == first and history[1].data_version == second
    assert len(reg.bases()) == 1

    out = run_retrain()  # same data version: nothing new to publish
    assert "Completed" in out, out
    assert [kv.version for kv in reg.history()] == [1, 2]
    assert len(reg.client.search_model_versions("name='sched-key'")) == 2
