"""The story over MLflow on a real PostgreSQL 15 + S3 (moto): lock -> 2 key-only updates ->
evaluate -> a site pulls each version (site sha256 = owner's); the `adaloc registry`
listing/audit commands read the same server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.conftest import make_owner_and_site, tiny_overrides

pytestmark = pytest.mark.slow
ADALOC = str(Path(sys.executable).with_name("adaloc"))


def _adaloc(*args: str) -> list | dict:
    proc = subprocess.run([ADALOC, *args, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_story_on_postgres_backend(tmp_path, prefect_api, mlflow_pg_server, s3_endpoint, postgres):
    import psycopg

    from pipelines.flows.evaluate import evaluate_flow
    from pipelines.flows.lock import lock_flow
    from pipelines.flows.update import update_flow
    from registry import KeyRegistry

    ov = tiny_overrides(
        tmp_path,
        name="pg",
        tracking_uri=mlflow_pg_server.tracking_uri,
        artifact_location="",
        s3_endpoint=s3_endpoint.url,
    )
    site = make_owner_and_site(tmp_path, ov)
    results, pulls = [], []
    for flow in (lock_flow, update_flow, update_flow):
        results.append(flow(overrides=ov, progress=False))
        pulls.append(site.pull(results[-1]["version"]))
    evaluation = evaluate_flow(overrides=ov, ref="3")
    assert [r["version"] for r in results] == [1, 2, 3]
    assert [p.model_sha256 for p in pulls] == [r["model_sha256"] for r in results]
    assert "authorized_acc" in json.dumps(evaluation)

    # the records really live in PostgreSQL (not a sqlite file next to the server)
    dsn = f"host={postgres.host} port={postgres.port} user={postgres.user} dbname=mlflow"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT version FROM model_versions WHERE name = %s ORDER BY version", ("pg-key",)
        ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert not list(Path(mlflow_pg_server.log).parent.glob("*.db"))

    reg = KeyRegistry(mlflow_pg_server.tracking_uri, "pg")
    uri = ["--tracking-uri", mlflow_pg_server.tracking_uri, "--model", "pg"]
    listed = _adaloc("registry", "ls", *uri)
    assert [row["version"] for row in listed] == [kv.version for kv in reg.history()] == [1, 2, 3]
    lineage = _adaloc("registry", "lineage", "3", *uri)
    assert [row["version"] for row in lineage] == [3, 2, 1]
    shown = _adaloc("registry", "show", "3", *uri)
    assert shown["version"] == 3 and shown["parent"] == 2
    owner_pub = Path(ov["owner_dir"]) / "owner.pub"
    verified = _adaloc("registry", "verify", "3", "--owner-pub", str(owner_pub), *uri)
    assert verified["version"] == 3
