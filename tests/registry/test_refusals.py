"""Issue 4, point 4: every bad pull is refused with one clear line and a non-zero exit, and
the site's installed model and state stay exactly as they were.

Through the real `mlflow server` + S3 endpoint: a tampered byte in the stored sealed key
(with and without fixing up the MLflow tags), a wrong site key, a revoked site, a key for
another base, and an older version.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from registry.errors import BaseMismatchError
from registry.keyring import OwnerKeyring
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import installed_bytes, make_locked, publish, run_cli

pytestmark = pytest.mark.slow
NAME = "refuse"


@pytest.fixture(scope="module")
def world(mlflow_server, locked, tmp_path_factory):
    """Sites `good` (at v2) and `gone` (at v1, revoked before v2); versions 1 and 2 published."""
    root = tmp_path_factory.mktemp("refuse")
    owner = OwnerKeyring.init(root / "owner")
    sites = {}
    for site_id in ("good", "gone"):
        sites[site_id] = Site.init(root / site_id, site_id=site_id, model_name=NAME,
                                   tracking_uri=mlflow_server.tracking_uri,
                                   owner_public_pem=owner.owner_public_pem)  # fmt: skip
        owner.add_site(site_id, sites[site_id].public_key_pem)
    reg = KeyRegistry(mlflow_server.tracking_uri, NAME)
    reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    publish(reg, locked, owner, 1, aliases=("production",))
    assert sites["gone"].pull().version == 1
    assert sites["good"].pull().version == 1
    shutil.copytree(sites["good"].directory, root / "good-at-v1", symlinks=True)
    owner.revoke_site("gone")
    publish(reg, locked, owner, 2, parent=1, aliases=("production",))
    assert sites["good"].pull().version == 2
    return reg, owner, sites, root


def _snapshot(site: Site) -> dict:
    return installed_bytes(site)


def _refused(site: Site, *args: str, match: str) -> str:
    """Pull through the CLI; assert exit 1, one line on stderr naming ``match``, nothing changed."""
    before = _snapshot(site)
    res = run_cli("site", "pull", *args, "--dir", site.directory)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert _snapshot(site) == before
    return lines[0]


def _sealed_object(s3, kv) -> str:
    objects = s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]
    (key,) = [o["Key"] for o in objects if kv.run_id in o["Key"] and o["Key"].endswith(".sealed")]
    return key


@pytest.mark.parametrize("offset", [5, 40, -300, -1])
def test_tampered_stored_key_is_refused(world, s3_endpoint, offset):
    reg, owner, sites, _ = world
    kv = reg.resolve(2)
    s3, name = s3_endpoint.client(), _sealed_object(s3_endpoint, kv)
    original = s3.get_object(Bucket=s3_endpoint.bucket, Key=name)["Body"].read()
    bad = bytearray(original)
    bad[offset] ^= 0x40
    s3.put_object(Bucket=s3_endpoint.bucket, Key=name, Body=bytes(bad))
    try:
        site = _fresh_site(world, "good-at-v1")
        line = _refused(site, "2", match="the signed one is")
        assert "tampered" in line
        pub = site.directory / "owner.pub"
        res = run_cli("registry", "verify", "2", "-m", NAME, "--tracking-uri", reg.tracking_uri,
                      "--owner-pub", pub)  # fmt: skip
        assert res.exit_code == 1 and "tampered" in res.stderr
        # An attacker who can also rewrite the MLflow tags changes nothing: sites read the
        # sha256 from the owner-signed targets record, not from tags.
        forged = hashlib.sha256(bad).hexdigest()
        reg.client.set_model_version_tag(
            reg.key_name, str(kv.mlflow_version), "artifact_sha256", forged
        )
        _refused(site, "2", match="tampered")
    finally:
        s3.put_object(Bucket=s3_endpoint.bucket, Key=name, Body=original)
        reg.client.set_model_version_tag(
            reg.key_name, str(kv.mlflow_version), "artifact_sha256", kv.artifact_sha256
        )
    assert _fresh_site(world, "good-at-v1").pull("2").version == 2  # restored: fine again


def _fresh_site(world, name: str) -> Site:
    """A copy of a site folder (same keys and state), so each refusal starts from known state."""
    root = world[3]
    target = root / f"{name}-copy"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / name, target, symlinks=True)
    return Site(target)


def test_wrong_site_key_is_refused(world, tmp_path):
    reg, owner, sites, root = world
    impostor = _fresh_site(world, "gone")  # holds v1, config says site "gone"
    # Swap in a different key pair under the authorised site's name.
    shutil.copy(sites["good"].directory / "site.json", impostor.directory / "site.json")
    _refused(impostor, "2", match="not this site's key")


def test_revoked_site_is_refused(world):
    _, _, sites, _ = world
    line = _refused(sites["gone"], "production", match="not a recipient of key version 2")
    assert "revoked" in line
    assert sites["gone"].installed()["version"] == 1


def test_older_version_is_refused_unless_allowed(world):
    reg, _, sites, _ = world
    site = _fresh_site(world, "good")
    _refused(site, "1", match="older than installed version 2")
    result = site.pull("1", allow_rollback=True)
    assert (result.version, result.previous) == (1, 2)


def test_key_for_another_base_is_refused(world, tmp_path):
    reg, owner, sites, _ = world
    other = make_locked(tmp_path, seed=3, versions=1)
    reg.publish_base(other.base_dir, base_sha256=other.base_sha256)
    key = other.keys[1]
    key.version = 3  # a later version number, but sealed for the other lock's base
    reg.publish_key(key, owner=owner, model_sha256=other.model_sha256[1], aliases=("other",))
    site = _fresh_site(world, "good-at-v1")
    _refused(site, "other", match="for base")
    with pytest.raises(BaseMismatchError):
        site.pull(3)
    # Tag rewritten to claim our base: the signed header still names the other base.
    kv = reg.resolve("other")
    reg.client.set_model_version_tag(reg.key_name, str(kv.mlflow_version), "base_sha256",
                                     sites["good"].installed()["base_sha256"])  # fmt: skip
    _refused(site, "other", match="for base")


def test_authenticated_key_that_does_not_decode_leaves_nothing_behind(world, locked, monkeypatch):
    """A site starts writing an install as soon as the sealed parts authenticate, before the
    key decodes: a key the owner's own tool sealed wrong (v1's artifact under a later
    version's header) is refused by the decode's checks, and no staged file stays on disk."""
    import copy

    from adaloc.artifact import encode_key

    reg, owner, _, _ = world
    seal, wrong = OwnerKeyring.seal, encode_key(locked.keys[1])

    def sealing_a_wrong_artifact(self, parts, header):
        return seal(self, {**parts, "key": wrong}, header)

    key = copy.copy(locked.keys[3])
    key.version, key.parent = max(kv.version for kv in reg.history()) + 1, 2
    monkeypatch.setattr(OwnerKeyring, "seal", sealing_a_wrong_artifact)
    reg.publish_key(key, owner=owner, model_sha256=locked.model_sha256[3], aliases=("wrong",))
    monkeypatch.undo()
    site = _fresh_site(world, "good")
    sets_before = sorted(p.name for p in (site.directory / "installs").iterdir())
    _refused(site, "wrong", match=f"key artifact says version 1, targets say {key.version}")
    assert sorted(p.name for p in (site.directory / "installs").iterdir()) == sets_before
