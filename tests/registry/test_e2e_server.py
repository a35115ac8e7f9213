"""Issue 4, points 1 and 3: a real `mlflow server` with S3 (moto) artifacts on loopback.

lock -> publish base + v1 -> key-only updates v2, v3 -> a site pulls the base once, then each
key version; its model is bit-identical to the owner's every time. The MLflow client (what
the UI shows) lists the key versions with lineage tags, aliases and metrics.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from adaloc.formats import sha256_file
from adaloc.lock import state_sha256
from registry.keyring import OwnerKeyring
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import make_locked, plain_key_bytes, publish, run_cli

pytestmark = pytest.mark.slow
NAME = "e2e"


@pytest.fixture(scope="module")
def world(mlflow_server, locked, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    owner = OwnerKeyring.init(root / "owner")
    site = Site.init(
        root / "site",
        site_id="plant-1",
        tracking_uri=mlflow_server.tracking_uri,
        model_name=NAME,
        owner_public_pem=owner.owner_public_pem,
    )
    owner.add_site("plant-1", site.public_key_pem)
    reg = KeyRegistry(mlflow_server.tracking_uri, NAME)
    return reg, owner, site


def _installed_sha(site: Site) -> str:
    """sha256 of the full model the site can export (base + installed key)."""
    from safetensors.torch import load_file

    return state_sha256(load_file(site.export()["path"]))


def test_base_once_then_key_versions_bit_identical(world, locked, s3_endpoint):
    reg, owner, site = world
    bv = reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    assert reg.publish_base(locked.base_dir).mlflow_version == bv.mlflow_version  # once per lock
    publish(reg, locked, owner, 1, aliases=("candidate", "production"))

    first = site.pull("production")
    assert (first.version, first.previous, first.changed) == (1, None, True)
    assert first.bytes_base == bv.bytes > 0
    assert _installed_sha(site) == locked.model_sha256[1] == first.model_sha256
    first_base_inode = site.installed_set().base_path.stat().st_ino

    for v in (2, 3):
        publish(reg, locked, owner, v, parent=v - 1, aliases=("candidate",))
        reg.promote(v, owner=owner)
        result = site.pull("production")
        assert (result.version, result.previous, result.bytes_base) == (v, v - 1, 0)
        assert 0 < result.bytes_key < bv.bytes
        assert _installed_sha(site) == locked.model_sha256[v]
        s = site.installed_set()
        assert (s.version, s.model_sha256) == (v, locked.model_sha256[v])
        assert s.base_path.stat().st_ino == first_base_inode  # base never rewritten
        assert sha256_file(s.key_path) == s.state["key_sha256"]
        print(f"v{v}: key {result.bytes_key} B vs base {bv.bytes} B, {result.seconds}")

    assert site.pull("production").changed is False  # nothing to do, nothing downloaded
    prefix = f"mlartifacts/{reg._experiment()}/"  # this model's experiment only
    objects = s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket, Prefix=prefix)[
        "Contents"
    ]
    names = [o["Key"] for o in objects]
    assert sum(n.endswith("/base.safetensors") for n in names) == 1
    assert sum(n.endswith("/key.sealed") for n in names) == 3
    assert sum(n.endswith("/targets.json") for n in names) == 3
    stored = b"".join(
        s3_endpoint.client().get_object(Bucket=s3_endpoint.bucket, Key=n)["Body"].read()
        for n in names
    )
    for v in (1, 2, 3):  # the plain key never reaches the artifact store
        plain = plain_key_bytes(locked, v)
        assert plain not in stored and plain[-256:] not in stored


def test_mlflow_client_shows_audit_trail(world, locked, mlflow_server):
    reg, owner, site = world
    client = MlflowClient(mlflow_server.tracking_uri)
    versions = client.search_model_versions(f"name='{NAME}-key'")
    by_key = {int(mv.tags["key_version"]): mv for mv in versions}
    assert sorted(by_key) == [1, 2, 3]
    for v, mv in by_key.items():
        tags = mv.tags
        assert tags["status"] == "ready"
        assert tags["parent"] == ("" if v == 1 else str(v - 1))
        assert tags["base_sha256"] == locked.base_sha256
        assert tags["model_sha256"] == locked.model_sha256[v]
        assert len(tags["artifact_sha256"]) == 64 and len(tags["code_version"]) >= 7
        assert tags["data_version"] == f"data-{v}" and "budget" in tags["key_spec"]
        assert int(tags["sealed_bytes"]) > int(tags["key_bytes"]) > 0
        assert tags["recipients"] == "plant-1"
        metrics = client.get_run(mv.run_id).data.metrics
        assert metrics["authorized_acc"] == pytest.approx(0.9 + v / 100)
        assert plain_key_bytes(locked, v).hex()[:64] not in str(tags)
    assert client.get_model_version_by_alias(f"{NAME}-key", "production").tags["key_version"] == "3"
    assert len(client.search_model_versions(f"name='{NAME}-base'")) == 1
    assert [kv.version for kv in reg.lineage("production")] == [3, 2, 1]
    assert reg.verify(3, owner_public_pem=owner.owner_public_pem)["ok"]


def test_cli_lists_and_reads_the_server(world, mlflow_server):
    uri = mlflow_server.tracking_uri
    res = run_cli("registry", "ls", "--model", NAME, "--tracking-uri", uri, "--json")
    assert res.exit_code == 0, res.output
    import json

    rows = json.loads(res.stdout)
    assert [r["version"] for r in rows] == [1, 2, 3] and "production" in rows[2]["aliases"]
    res = run_cli("registry", "lineage", "3", "-m", NAME, "--tracking-uri", uri, "--json")
    assert [r["version"] for r in json.loads(res.stdout)] == [3, 2, 1]
    res = run_cli("registry", "show", "v2", "-m", NAME, "--tracking-uri", uri)
    assert res.exit_code == 0 and "authorized_acc" in res.stdout


def test_status_online_then_offline_from_cache(world, monkeypatch):
    reg, owner, site = world
    online = site.status()
    assert online["installed"]["version"] == 3 and not online["offline"]
    assert [v["version"] for v in online["available"]] == [1, 2, 3]
    assert online["model_intact"] and not online["update_available"]
    # The server is unreachable: status still answers from the site's cache.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    away = Site(site.directory)
    away._registry = KeyRegistry("http://127.0.0.1:9", NAME)
    cached = away.status()
    assert cached["offline"] and cached["error"] and cached["installed"]["version"] == 3
    assert [v["version"] for v in cached["available"]] == [1, 2, 3]
    res = run_cli("site", "status", "--dir", site.directory, "--offline", "--json")
    assert res.exit_code == 0 and '"offline": true' in res.stdout


def test_direct_s3_artifact_location_same_code(mlflow_server, s3_endpoint, tmp_path):
    """Client-side boto3 to S3 (experiment artifact root s3://...): only the URI changes."""
    lm = make_locked(tmp_path, seed=7, versions=1)
    location = f"s3://{s3_endpoint.bucket}/direct"
    reg = KeyRegistry(mlflow_server.tracking_uri, "direct", artifact_location=location)
    owner = OwnerKeyring.init(tmp_path / "owner")
    site = Site.init(tmp_path / "site", site_id="s", tracking_uri=mlflow_server.tracking_uri,
                     model_name="direct", owner_public_pem=owner.owner_public_pem)  # fmt: skip
    owner.add_site("s", site.public_key_pem)
    reg.publish_base(lm.base_dir, base_sha256=lm.base_sha256)
    kv = publish(reg, lm, owner, 1, aliases=("production",))
    assert kv.source.startswith(location)
    assert site.pull().model_sha256 == lm.model_sha256[1]


def test_kept_presigned_url_is_renewed_in_the_background_past_half_life(mlflow_server, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """A fixed-path file's presigned URL is kept: the next read asks the server for none.
    Past half its life it still serves, and a new one is asked for on the presign worker
    (not the reader's thread); inside the expiry margin the reader asks for a new one."""
    import os
    import threading
    import time

    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    from registry import chain as C
    from registry import fetch as FE
    from registry import run_io
    from registry.workers import worker

    reg = KeyRegistry(mlflow_server.tracking_uri, "renew")
    exp = MlflowClient(mlflow_server.tracking_uri).create_experiment("renew-urls")
    run_id = reg.client.create_run(exp).info.run_id
    data = os.urandom(FE.DIRECT_MIN_BYTES + 4096)
    C.upload(reg, run_id, "fixed", "blob.bin", data)
    asked, original = [], MlflowArtifactsRepository._get_presigned_download_url

    def spy(repo, name):
        asked.append(threading.current_thread().name)
        return original(repo, name)

    monkeypatch.setattr(MlflowArtifactsRepository, "_get_presigned_download_url", spy)
    urls: dict = {}

    def read(i: int) -> bytes:
        dst = tmp_path / f"r{i}"
        run_io.fetch_file(reg, run_id, "fixed/blob.bin", dst, max_bytes=len(data), urls=urls,
                          durable=False)  # fmt: skip
        worker("presign").submit(lambda: None).result()  # (a renewal, if any, is done)
        return dst.read_bytes()

    assert read(0) == data and asked == [threading.current_thread().name]
    ((key, kept),) = urls.items()
    assert kept["expires"] > kept["renew_at"] > time.time()
    assert read(1) == data and len(asked) == 1  # the kept URL: no request to the server
    kept["renew_at"] = time.time() - 1  # past half its life: used, and renewed beside it
    assert read(2) == data and asked[1:] == ["adaloc-presign_0"]
    assert urls[key]["url"] and urls[key]["renew_at"] > time.time()
    assert urls[key]["etag"] == kept["etag"] and "renewing" not in urls[key]
    urls[key]["expires"] = time.time() + FE.URL_MARGIN_S / 2  # too close to expiry: asked now
    assert read(3) == data and asked[2:] == [threading.current_thread().name]

    # A small file (through the server's proxy until its URL is kept, asked for beside the
    # read): a spent URL is dropped, so the next read asks for a new one the same way.
    small = os.urandom(4096)
    C.upload(reg, run_id, "fixed", "small.bin", small)
    dst = tmp_path / "s"

    def read_small() -> bytes:
        run_io.fetch_file(reg, run_id, "fixed/small.bin", dst, max_bytes=len(small), urls=urls,
                          durable=False)  # fmt: skip
        worker("presign").submit(lambda: None).result()
        return dst.read_bytes()

    del asked[:]
    assert read_small() == small and asked == ["adaloc-presign_0"]
    (skey,) = (k for k in urls if k.endswith("small.bin"))
    assert read_small() == small and len(asked) == 1 and urls[skey]["url"]
    urls[skey]["expires"] = time.time() + FE.URL_MARGIN_S / 2
    assert read_small() == small and asked == ["adaloc-presign_0"] * 2
    assert urls[skey]["expires"] - time.time() > FE.URL_MARGIN_S
