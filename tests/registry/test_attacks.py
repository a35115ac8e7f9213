"""Issue 13: the registry attacker. Plain MLflow + S3 write access, no owner key.

Against a real `mlflow server` + S3 endpoint: unsigned promote, rollback on a re-deployed
site, freeze (hidden versions, stale timestamp past expiry), mix-and-match (old key, new
base, foreign model.json, foreign token), endless data, path-like tags, forged and
duplicate version numbers. Each is refused with one clear line (or simply has no effect),
the installed set stays byte-identical, and the site then pulls the real latest version
without any manual cleanup.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from registry import trust as T
from registry.keyring import OwnerKeyring
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import installed_bytes, make_locked, publish, run_cli

pytestmark = pytest.mark.slow
NAME = "attacked"


@pytest.fixture(scope="module")
def world(mlflow_server, s3_endpoint, locked, tmp_path_factory):
    """v1 (then production) .. v3 (production) published; sites at v3 and a fresh one."""
    root = tmp_path_factory.mktemp("attacks")
    owner = OwnerKeyring.init(root / "owner")
    site = Site.init(root / "at-v3", site_id="plant", model_name=NAME,
                     tracking_uri=mlflow_server.tracking_uri,
                     owner_public_pem=owner.owner_public_pem)  # fmt: skip
    owner.add_site("plant", site.public_key_pem)
    shutil.copytree(site.directory, root / "fresh")  # same keys, never pulled
    reg = KeyRegistry(mlflow_server.tracking_uri, NAME)
    reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    publish(reg, locked, owner, 1, aliases=("production",))
    old_timestamp = _get(s3_endpoint, _object(s3_endpoint, reg, "trust/timestamp.json"))
    publish(reg, locked, owner, 2, parent=1, aliases=("production",))
    publish(reg, locked, owner, 3, parent=2, aliases=("production",))
    assert site.pull().version == 3
    return {"reg": reg, "owner": owner, "root": root, "s3": s3_endpoint,
            "old_timestamp": old_timestamp, "locked": locked}  # fmt: skip


def _objects(s3, reg) -> list[str]:
    prefix = f"mlartifacts/{reg._experiment()}/"
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _object(s3, reg, suffix: str, run_id: str | None = None) -> str:
    names = [n for n in _objects(s3, reg) if n.endswith(suffix) and (run_id or "") in n]
    assert len(names) == 1, names
    return names[0]


def _get(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


@contextmanager
def tampered(s3, key: str, data: bytes):
    """The attacker overwrites one object; it is restored afterwards."""
    original = _get(s3, key)
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)
    try:
        yield
    finally:
        s3.client().put_object(Bucket=s3.bucket, Key=key, Body=original)


def _copy(world, name: str) -> Site:
    target = world["root"] / f"{name}-{time.monotonic_ns()}"
    shutil.copytree(world["root"] / name, target, symlinks=True)
    return Site(target)


def _redeployed(world) -> Site:
    """Same site.key and rollback guard (seen.json beside it); installs and cache wiped."""
    site = _copy(world, "at-v3")
    for p in ("installs", "current", "cache"):
        path = site.directory / p
        if path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
    return site


def refused(site: Site, ref: str, match: str) -> str:
    """CLI pull: exit 1, one line naming ``match``, installed set byte-identical."""
    before = installed_bytes(site)
    res = run_cli("site", "pull", ref, "--dir", site.directory)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert installed_bytes(site) == before
    return lines[0]


def recovers(world, site: Site, version: int = 3) -> None:
    """After the attack ends the site pulls the real latest, no manual cleanup."""
    got = site.pull("latest")
    assert got.version == version
    assert (
        site.installed_set(verify=True, verify_base=True).model_sha256
        == (world["locked"].model_sha256[version])
    )


def test_unsigned_promote_is_refused_and_ignored(world):
    reg, s3 = world["reg"], world["s3"]
    res = run_cli("registry", "promote", "1", "-m", NAME, "--tracking-uri", reg.tracking_uri,
                  "--owner-dir", world["root"] / "no-owner")  # fmt: skip
    assert res.exit_code == 1 and "no-owner" in res.stderr and "Traceback" not in res.output
    # MLflow aliases are hints: moving one by hand changes what no site installs.
    reg.client.set_registered_model_alias(reg.key_name, "production", "1")
    try:
        fresh = _copy(world, "fresh")
        assert fresh.pull("production").version == 3
        assert _copy(world, "at-v3").pull("production").changed is False
    finally:
        reg.client.set_registered_model_alias(reg.key_name, "production", "3")
    # A promotion signed with the attacker's own key is not the owner's.
    ts_key = _object(s3, reg, "trust/timestamp.json")
    env = json.loads(_get(s3, ts_key))
    signed = dict(env["signed"])
    promo = dict(signed["promotion"]["signed"], key_version=1)
    signed["promotion"] = T.sign(promo, [Ed25519PrivateKey.generate()])
    signed["counter"] += 1
    forged = T.canonical(T.sign(signed, [Ed25519PrivateKey.generate()]))
    with tampered(s3, ts_key, forged):
        refused(_copy(world, "at-v3"), "production", "valid owner signature")
    recovers(world, _copy(world, "fresh"))


def test_rollback_on_redeployed_site_is_refused(world):
    reg, s3 = world["reg"], world["s3"]
    ts_key = _object(s3, reg, "trust/timestamp.json")
    site = _redeployed(world)
    with tampered(s3, ts_key, world["old_timestamp"]):  # validly signed, production = v1
        line = refused(site, "production", "below")
        assert "already seen" in line and "--allow-rollback" in line
        refused(_copy(world, "at-v3"), "production", "below")
    recovers(world, site)


def test_freeze_hidden_versions_have_no_effect(world):
    reg = world["reg"]
    client = reg.client
    client.set_model_version_tag(reg.key_name, "3", "status", "pending")
    client.delete_registered_model_alias(reg.key_name, "production")
    try:
        assert [kv.version for kv in reg.history()] == [1, 2]  # hidden in MLflow
        site = _copy(world, "fresh")
        assert site.pull("latest").version == 3
        status = site.status()
        assert [v["version"] for v in status["available"]] == [1, 2, 3]
        assert "production" in status["available"][-1]["aliases"]
    finally:
        client.set_model_version_tag(reg.key_name, "3", "status", "ready")
        client.set_registered_model_alias(reg.key_name, "production", "3")


def test_stale_timestamp_past_expiry_is_refused(world):
    reg, owner = world["reg"], world["owner"]
    reg.timestamp_expiry = timedelta(seconds=2)
    try:
        reg.sign_timestamp(owner)
        time.sleep(2.5)  # the owner stopped re-signing; the registry serves the last record
        line = refused(_copy(world, "at-v3"), "production", "expired at")
        assert "re-signed" in line
        status = _copy(world, "at-v3").status()
        assert status["offline"] and "expired" in status["error"]
    finally:
        reg.timestamp_expiry = T.DEFAULT_TIMESTAMP_EXPIRY
        reg.sign_timestamp(owner)  # what the scheduled retrain flow does
    recovers(world, _copy(world, "fresh"))


def test_mix_and_match_old_key_new_base_foreign_card(world, tmp_path):
    reg, s3 = world["reg"], world["s3"]
    v1, v3 = reg.resolve(1), reg.resolve(3)
    sealed3 = _object(s3, reg, "key/key.sealed", v3.run_id)
    with tampered(s3, sealed3, _get(s3, _object(s3, reg, "key/key.sealed", v1.run_id))):
        refused(_copy(world, "fresh"), "3", "tampered")
    other = make_locked(tmp_path, seed=11, versions=1)
    base_key = _object(s3, reg, "base/base.safetensors")
    with tampered(s3, base_key, (other.base_dir / "base.safetensors").read_bytes()):
        site = _copy(world, "fresh")
        refused(site, "production", "tampered")
        assert not any((site.directory / "cache" / "bases").glob("[0-9a-f]*"))  # not cached
    card_key = _object(s3, reg, "base/model.json")
    card = json.loads(_get(s3, card_key))
    with tampered(s3, card_key, json.dumps({**card, "builder": "evil"}).encode()):
        refused(_copy(world, "fresh"), "production", "model.json")
    recovers(world, _copy(world, "fresh"))


def test_foreign_token_and_targets_are_refused(world, tmp_path):
    """A validly owner-signed blob or targets record of another model does not mix in."""
    reg, s3, owner = world["reg"], world["s3"], world["owner"]
    from adaloc.token import Token

    other = make_locked(tmp_path, seed=12, versions=1)
    oreg = KeyRegistry(reg.tracking_uri, f"{NAME}-other")
    oreg.publish_base(other.base_dir, base_sha256=other.base_sha256)
    okv = oreg.publish_key(other.keys[1], owner=owner, token=Token.generate("binary", seed=1),
                           model_sha256=other.model_sha256[1])  # fmt: skip
    v3 = reg.resolve(3)
    foreign_blob = _get(s3, _object(s3, oreg, "key/key.sealed", okv.run_id))
    with tampered(s3, _object(s3, reg, "key/key.sealed", v3.run_id), foreign_blob):
        refused(_copy(world, "fresh"), "3", "tampered")
    foreign_targets = _get(s3, _object(s3, oreg, "key/targets.json", okv.run_id))
    # v3 is a head (latest, production): the timestamp carries its signed targets record, so
    # the stored file is not read and the pull installs the owner's v3.
    with tampered(s3, _object(s3, reg, "key/targets.json", v3.run_id), foreign_targets):
        got = _copy(world, "fresh").pull("3")
        assert got.model_sha256 == world["locked"].model_sha256[3]
    # v2 is listed only in the snapshot shards: its stored targets record is what a site
    # reads, pinned by the shard's sha256, and a foreign one is refused.
    v2 = reg.resolve(2)
    with tampered(s3, _object(s3, reg, "key/targets.json", v2.run_id), foreign_targets):
        refused(_copy(world, "fresh"), "2", "tampered")
    recovers(world, _copy(world, "fresh"))


@pytest.mark.parametrize(
    "suffix, size, match",
    [
        ("base/base.safetensors", 48 << 20, "longer than its limit"),
        ("key/key.sealed", 16 << 20, "longer than its limit"),
        ("trust/timestamp.json", 16 << 20, "longer than its limit"),
    ],
)
def test_endless_data_is_cut_at_the_signed_length(world, suffix, size, match):
    reg, s3 = world["reg"], world["s3"]
    run_id = reg.resolve(3).run_id if suffix.startswith("key/") else None
    key = _object(s3, reg, suffix, run_id)
    site = _copy(world, "fresh")
    with tampered(s3, key, b"\0" * size):
        t0 = time.perf_counter()
        refused(site, "3", match)
        took = time.perf_counter() - t0
    cached = sum(p.stat().st_size for p in site.directory.rglob("*") if p.is_file())
    assert cached < 4 << 20, cached  # nothing near the junk's size stayed on disk
    print(f"endless {suffix}: refused in {took:.2f}s")
    recovers(world, site)


def test_path_like_tags_change_nothing(world):
    reg = world["reg"]
    site = _copy(world, "at-v3")
    before = installed_bytes(site)
    cache = sorted(p.name for p in (site.directory / "cache" / "bases").iterdir())
    originals = {k: reg.client.get_model_version(reg.key_name, "3").tags[k]
                 for k in ("base_sha256", "key_version")}  # fmt: skip
    try:
        for value in ("..", "x/y", "../../etc"):
            reg.client.set_model_version_tag(reg.key_name, "3", "base_sha256", value)
            reg.client.set_model_version_tag(reg.key_name, "3", "key_version", value)
            reg.client.set_model_version_tag(reg.base_name, "1", "base_sha256", value)
            assert site.pull("production").changed is False
            fresh = _copy(world, "fresh")
            assert fresh.pull("production").version == 3
        res = run_cli("registry", "ls", "-m", NAME, "--tracking-uri", reg.tracking_uri)
        assert "Traceback" not in res.output
    finally:
        for k, v in originals.items():
            reg.client.set_model_version_tag(reg.key_name, "3", k, v)
        reg.client.set_model_version_tag(
            reg.base_name, "1", "base_sha256", originals["base_sha256"]
        )
    assert installed_bytes(site) == before
    assert sorted(p.name for p in (site.directory / "cache" / "bases").iterdir()) == cache


def test_forged_and_duplicate_version_numbers(world):
    reg = world["reg"]
    v1 = reg.resolve(1)
    forged = {"key_version": "99", "status": "ready", "base_sha256": v1.base_sha256}
    mv99 = reg.client.create_model_version(reg.key_name, v1.source, run_id=v1.run_id, tags=forged)
    dup = {**forged, "key_version": "3"}
    mvdup = reg.client.create_model_version(reg.key_name, v1.source, run_id=v1.run_id, tags=dup)
    try:
        site = _copy(world, "at-v3")
        refused(site, "99", "not in the owner's signed list")
        fresh = _copy(world, "fresh")
        assert fresh.pull("latest").version == 3  # not 99
        assert fresh.pull("3").changed is False
        assert fresh.installed_set().model_sha256 == world["locked"].model_sha256[3]
        assert [v["version"] for v in fresh.status()["available"]] == [1, 2, 3]
    finally:
        for mv in (mv99, mvdup):
            reg.client.delete_model_version(reg.key_name, mv.version)
    recovers(world, _copy(world, "fresh"))


def test_extra_trust_run_with_forged_records_is_ignored(world):
    reg = world["reg"]
    run = reg.client.create_run(reg._experiment(), run_name="trust",
                                tags={"adaloc.kind": "trust"})  # fmt: skip
    evil = Ed25519PrivateKey.generate()
    fake = T.sign({**json.loads(world["old_timestamp"])["signed"], "counter": 1 << 40}, [evil])
    path = world["root"] / "timestamp.json"
    path.write_bytes(T.canonical(fake))
    reg.client.log_artifact(run.info.run_id, str(path), "trust")
    try:
        assert _copy(world, "fresh").pull("production").version == 3
    finally:
        reg.client.delete_run(run.info.run_id)


def test_bad_cache_entry_is_quarantined_and_refetched(world):
    """A damaged cached base (here: truncated) never blocks the site: it is moved to
    cache/quarantine/ and fetched again, checked against the signed sha256."""
    site = _copy(world, "at-v3")
    base = site.installed_set().base_path
    base.write_bytes(base.read_bytes()[:1000])
    status = site.status()
    assert status["installed"]["version"] == 3 and not status["model_intact"]
    got = site.pull("latest")  # same version: the damaged set is re-installed
    assert (got.version, got.changed) == (3, True) and got.bytes_base > 1000
    quarantined = [p for p in (site.directory / "cache" / "quarantine").iterdir() if p.is_dir()]
    assert len(quarantined) == 1 and quarantined[0].name.startswith(got.base_sha256)
    recovers(world, site)
