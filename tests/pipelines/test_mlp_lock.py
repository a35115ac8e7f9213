"""The lock flow on a norm-free network: hardening, hide_fanout and a trained, hardened decoy
donor whose rows fill the key positions (adaloc.lock.default_fill); a site restores the
owner's model bit for bit."""

from __future__ import annotations

import pytest

from tests.pipelines.conftest import make_owner_and_site, tiny_overrides

pytestmark = pytest.mark.slow


def test_lock_flow_fills_a_norm_free_key_with_a_trained_decoy(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from pipelines.flows.lock import lock_flow

    ov = tiny_overrides(tmp_path, name="mlpdecoy", dataset="digits", model="mlp", key={})
    ov.pop("train_limit"), ov.pop("test_limit")
    site = make_owner_and_site(tmp_path, ov)
    state = lock_flow(overrides=ov, progress=False, return_state=True)
    result = state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    names = {r.name for r in runs}
    assert {"harden", "train decoy donor", "lock"} <= {n.split("-")[0] for n in names}, names
    assert result["metrics"]["unauthorized_acc"] < 0.2 < result["metrics"]["authorized_acc"]
    site.pull(1)
    assert site.export()["model_sha256"] == result["model_sha256"]
