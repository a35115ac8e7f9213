"""Session-wide servers on loopback: a moto S3 endpoint and a real `mlflow server` process.

Both start lazily (only when a test asks for them), once per session, bound to 127.0.0.1 on
free ports, and are stopped at the end of the session. The MLflow server runs in its own
process group so the whole group is killed together (see registry/local_servers.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

S3_BUCKET = "adaloc-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1; sets MLFLOW_S3_ENDPOINT_URL and dummy AWS creds."""
    from registry.local_servers import moto_s3

    with moto_s3(S3_BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory) -> Iterator:
    """A real `mlflow server --workers 1` (sqlite backend, S3 artifacts via moto)."""
    from registry.local_servers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3=s3_endpoint) as server:
        yield server


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL (initdb in a temp dir) on 127.0.0.1, stopped as a group."""
    from tests.pg_server import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_pg_server(postgres, s3_endpoint, tmp_path_factory) -> Iterator:
    """`mlflow server` with its backend store on PostgreSQL and artifacts on S3 (moto)."""
    from registry.local_servers import mlflow_server

    uri = postgres.create_database("mlflow")
    root = tmp_path_factory.mktemp("mlflow-pg")
    with mlflow_server(root, s3=s3_endpoint, backend_store_uri=uri) as server:
        yield server
