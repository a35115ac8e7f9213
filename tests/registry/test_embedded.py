"""Embedded default (sqlite + local artifact folder, nothing to start), issue 4 point 5 (a
publication interrupted between steps is invisible, then completes on retry), and the CLI.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from registry.errors import NotFoundError, VersionConflictError
from registry.keyring import OwnerKeyring
from registry.mlflow_io import embedded_uris
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import publish, run_cli

NAME = "emb"


@pytest.fixture(scope="module")
def world(locked, tmp_path_factory):
    """Owner, site and embedded registry set up through the CLI, base published."""
    root = tmp_path_factory.mktemp("embedded")
    owner_dir, site_dir, reg_root = root / "owner", root / "site", root / "registry"
    assert run_cli("keys", "owner-init", "--owner-dir", owner_dir).exit_code == 0
    res = run_cli("site", "init", "--dir", site_dir, "--site-id", "lab", "-m", NAME,
                  "--root", reg_root, "--owner-pub", owner_dir / "owner.pub", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    pub = json.loads(res.stdout)["public_key"]
    assert run_cli("keys", "site-add", "lab", pub, "--owner-dir", owner_dir).exit_code == 0
    reg = KeyRegistry(
        *embedded_uris(reg_root)[:1], NAME, artifact_location=embedded_uris(reg_root)[1]
    )
    reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    return reg, OwnerKeyring(owner_dir), Site(site_dir), reg_root


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash between publication steps")


def test_embedded_publish_and_pull(world, locked):
    reg, owner, site, root = world
    assert reg.tracking_uri.startswith("sqlite:///")
    publish(reg, locked, owner, 1, aliases=("production",))
    first = site.pull()
    assert first.model_sha256 == locked.model_sha256[1] and first.bytes_base > 0
    assert (root / "artifacts").is_dir()


@pytest.mark.parametrize("step", ["_register", "_mark_ready"])
def test_interrupted_publication_is_invisible_then_retry_completes(world, locked, step):
    reg, owner, site, root = world
    version = {"_register": 2, "_mark_ready": 3}[step]
    before = {kv.version for kv in reg.history()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KeyRegistry, step, _crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            publish(reg, locked, owner, version, parent=version - 1, aliases=("production",))
    # Nothing half-published is visible to readers or sites.
    assert {kv.version for kv in reg.history()} == before
    with pytest.raises(NotFoundError):
        reg.resolve(version)
    assert reg.resolve("production").version == version - 1
    assert site.pull().version == version - 1

    kv = publish(reg, locked, owner, version, parent=version - 1, aliases=("production",))
    again = publish(reg, locked, owner, version, parent=version - 1, aliases=("production",))
    assert (kv.version, again.mlflow_version) == (version, kv.mlflow_version)
    client = MlflowClient(reg.tracking_uri)
    runs = client.search_runs([reg._experiment()], f"tags.key_version = '{version}'")
    assert len(runs) == 1  # the retry reused the crashed attempt's run
    versions = [mv for mv in reg._versions(reg.key_name) if mv.run_id == runs[0].info.run_id]
    assert len(versions) == 1 and versions[0].tags["status"] == "ready"
    assert len(client.get_run(kv.run_id).data.metrics) == 3  # logged once, not per attempt
    assert site.pull().model_sha256 == locked.model_sha256[version]


def test_versions_are_immutable(world, locked):
    reg, owner, _, _ = world
    other = {n: t + 1 for n, t in locked.keys[1].values.items()}
    from adaloc.lock import Key

    forged = Key(locked.keys[1].mask, other, locked.base_sha256, version=1)
    with pytest.raises(VersionConflictError, match="already published with other content"):
        reg.publish_key(forged, owner=owner)


def test_interrupted_base_publication_retries(tmp_path, locked):
    tracking, artifacts = embedded_uris(tmp_path / "reg")
    reg = KeyRegistry(tracking, "crashbase", artifact_location=artifacts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KeyRegistry, "_mark_ready", _crash)
        with pytest.raises(RuntimeError):
            reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    with pytest.raises(NotFoundError, match="publish the base first"):
        reg.base()
    bv = reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    assert bv.mlflow_version == 1 and len(reg._versions(reg.base_name)) == 1


def test_cli_registry_and_keys_commands(world, locked):
    reg, owner, site, root = world
    common = ("-m", NAME, "--root", root)
    rows = json.loads(run_cli("registry", "ls", *common, "--json").stdout)
    assert [r["version"] for r in rows] == [1, 2, 3]
    res = run_cli("registry", "promote", "2", "--alias", "canary", *common)
    assert res.exit_code == 1 and "owner-signed act" not in res.stderr  # default ./owner absent
    res = run_cli("registry", "promote", "2", "--alias", "canary", *common,
                  "--owner-dir", owner.directory, "--json")  # fmt: skip
    assert res.exit_code == 0 and "canary" in json.loads(res.stdout)["aliases"]
    res = run_cli("registry", "verify", "canary", *common)
    assert res.exit_code == 1 and "needs the owner's public key" in res.stderr
    res = run_cli("registry", "verify", "canary", *common,
                  "--owner-pub", owner.directory / "owner.pub", "--json")  # fmt: skip
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"]
    res = run_cli("registry", "show", "99", *common)
    assert res.exit_code == 1 and res.stderr.strip() == (
        f"error: key version 99 not found in '{NAME}-key' (have [1, 2, 3])"
    )
    res = run_cli("site", "status", "--dir", site.directory, "--json")
    status = json.loads(res.stdout)
    assert status["installed"]["version"] == 3 and not status["update_available"]
    assert run_cli("keys", "site-revoke", "lab", "--owner-dir", owner.directory).exit_code == 0
    sites = json.loads(run_cli("keys", "site-ls", "--owner-dir", owner.directory, "--json").stdout)
    assert sites[0]["site_id"] == "lab" and sites[0]["revoked_at"]
    res = run_cli("keys", "site-revoke", "nobody", "--owner-dir", owner.directory)
    assert res.exit_code == 1 and "not in" in res.stderr and "Traceback" not in res.output


def test_token_is_sealed_next_to_the_key(world, locked):
    """The M-LOCK token travels sealed with the key; only the site's model folder holds it."""
    from adaloc.formats import TOKEN_FILE
    from adaloc.lock import Key
    from adaloc.token import Token

    reg, owner, site, root = world
    owner.add_site("lab2", site.public_key_pem)  # "lab" was revoked by the CLI test
    site_cfg = json.loads((site.directory / "site.json").read_text())
    (site.directory / "site.json").write_text(json.dumps({**site_cfg, "site_id": "lab2"}))
    token = Token.generate("binary", seed=3)
    prev = locked.keys[3]
    key = Key(prev.mask, {n: t * 1.01 for n, t in prev.values.items()}, prev.base_sha256, 4, 3)
    kv = reg.publish_key(key, owner=owner, token=token, aliases=("production",))
    assert kv.token and kv.recipients == ["lab2"]
    assert Site(site.directory).pull().version == 4
    installed = Site(site.directory).installed_set().token_path
    assert installed.name == TOKEN_FILE
    assert Token.from_bytes(installed.read_bytes()).fingerprint() == token.fingerprint()
    assert oct(installed.stat().st_mode & 0o777) == "0o600"
    stored = b"".join(p.read_bytes() for p in (root / "artifacts").rglob("*") if p.is_file())
    assert token.to_bytes() not in stored
