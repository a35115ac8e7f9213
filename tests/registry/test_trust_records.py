"""Signed records (registry.trust) and the site's typed file readers, without servers; plus
key rotation and a 2-key promotion on the embedded registry."""

from __future__ import annotations

import json
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from registry import trust as T
from registry.errors import ExpiredError, NotFoundError, SiteFileError, TrustError
from registry.keyring import OwnerKeyring
from registry.mlflow_io import embedded_uris
from registry.sealing import generate_site_keys, key_fingerprint, public_pem_of
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import publish, run_cli


def _pems(*keys) -> dict[str, str]:
    return {key_fingerprint(public_pem_of(k)): public_pem_of(k).decode() for k in keys}


def test_signature_threshold_and_tampering():
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = T.make_root("m", [a], extra_public=[public_pem_of(b)], promote_threshold=2)
    env = T.sign(signed, [a])
    assert T.verify(env, "root", _pems(a, b), 1, "root").version == 1
    with pytest.raises(TrustError, match="1 valid owner signature"):
        T.verify(env, "root", _pems(a, b), 2, "root")
    assert T.verify(T.sign(signed, [a, b, a]), "root", _pems(a, b), 2, "root")
    forged = json.loads(T.canonical(env))
    forged["signed"]["threshold"] = 0
    with pytest.raises(TrustError):
        T.verify(forged, "root", _pems(a), 1, "root")
    env["signed"]["version"] = 2  # any change to signed bytes breaks the signature
    with pytest.raises(TrustError, match="0 valid"):
        T.verify(env, "root", _pems(a), 1, "root")


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "expected signed"),
        (b'{"signed": {"_type": "targets"}, "signatures": []}', "expected 'root'"),
        (b'{"signed": {"_type": "root", "version": "x"}, "signatures": []}', "field"),
    ],
)
def test_garbage_records_give_one_line_trust_errors(data, match):
    key = Ed25519PrivateKey.generate()
    with pytest.raises(TrustError, match=match) as err:
        T.verify(T.parse(data, "root", "root record"), "root", _pems(key), 1, "root record")
    assert "\n" not in str(err.value)


def test_expiry_and_root_chain():
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    anchor = T.anchor_root("m", public_pem_of(old))
    v1 = T.next_root(anchor, T.sign(T.make_root("m", [old]), [old]), "root v1")
    v2_signed = T.make_root("m", [new], version=2, retired=dict(v1.keys))
    with pytest.raises(TrustError, match="by root v1"):
        T.next_root(v1, T.sign(v2_signed, [new]), "root v2")  # the old key must agree
    with pytest.raises(TrustError, match="by its own keys"):
        T.next_root(v1, T.sign(v2_signed, [old]), "root v2")  # and the new one
    v2 = T.next_root(v1, T.sign(v2_signed, [old, new]), "root v2")
    assert set(v2.keys) == {key_fingerprint(public_pem_of(new))}
    assert set(T.seal_keys(v2)) == set(v2.keys) | set(v1.keys)
    stale = T.make_root("m", [old], expires=T.timedelta(seconds=-1))
    with pytest.raises(ExpiredError, match="expired at"):
        T.check_expiry(T._shape(stale, "root", "root"), "root record")


def test_site_init_refuses_a_site_key_as_owner_pub_and_leaves_nothing(tmp_path):
    generate_site_keys(tmp_path / "other")
    for bad, match in [
        ((tmp_path / "other" / "site.pub").read_bytes(), "expected the owner's Ed25519"),
        (b"", "empty"),
        (b"not a key", "not a PEM"),
    ]:
        (tmp_path / "owner.pub").write_bytes(bad)
        res = run_cli("site", "init", "--dir", tmp_path / "site", "--site-id", "x",
                      "--owner-pub", tmp_path / "owner.pub", "--root", tmp_path)  # fmt: skip
        assert res.exit_code == 1 and match in res.stderr and "Traceback" not in res.output
        assert not (tmp_path / "site").exists()


def test_site_readers_raise_typed_one_line_errors(tmp_path):
    owner = OwnerKeyring.init(tmp_path / "owner")
    site = Site.init(tmp_path / "site", site_id="s", tracking_uri="sqlite:///nowhere.db",
                     model_name="m", owner_public_pem=owner.owner_public_pem)  # fmt: skip
    from registry import site_files as F

    cases = {
        "site.json": [b"", b"{", b"[]", b'{"site_id": 3}'],
        "owner.pub": [b"", b"junk", site.public_key_pem],
        "site.key": [b"", b"junk", (tmp_path / "owner" / "owner.key").read_bytes()],
    }
    for name, payloads in cases.items():
        original = (site.directory / name).read_bytes()
        for payload in payloads:
            (site.directory / name).write_bytes(payload)
            with pytest.raises(SiteFileError) as err:
                Site(site.directory).pull()
            assert "\n" not in str(err.value) and name in str(err.value), (name, payload)
        (site.directory / name).write_bytes(original)
    models = {"seen.json": F.Seen, "state.json": F.InstallState, "available.json": F.Available}
    for name, model in models.items():
        for payload in (b"", b"garbage", b"[]", b'{"counter": -1, "versions": 3, "version": 0}'):
            (tmp_path / name).write_bytes(payload)
            with pytest.raises(SiteFileError) as err:
                F.read_model(tmp_path / name, model, name)
            assert "\n" not in str(err.value) and name in str(err.value), (name, payload)
    with pytest.raises(NotFoundError, match="does not exist"):
        Site(site.directory).pull()  # a mistyped sqlite URI is not an empty registry
    res = run_cli("registry", "ls", "--root", tmp_path / "no-registry")
    assert res.exit_code == 1 and "does not exist" in res.stderr
    assert not (tmp_path / "no-registry").exists()


@pytest.mark.slow
def test_rotation_and_two_key_promotion(tmp_path, locked):
    uri, loc = embedded_uris(tmp_path / "reg")
    reg = KeyRegistry(uri, "rot", artifact_location=loc)
    old, new = OwnerKeyring.init(tmp_path / "old"), OwnerKeyring.init(tmp_path / "new")
    co = OwnerKeyring.init(tmp_path / "co")
    site = Site.init(tmp_path / "site", site_id="s", tracking_uri=uri, model_name="rot",
                     owner_public_pem=old.owner_public_pem)  # fmt: skip
    for keyring in (old, new):
        keyring.add_site("s", site.public_key_pem)
    reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    publish(reg, locked, old, 1, aliases=("production",))
    assert site.pull().version == 1
    fresh = tmp_path / "fresh"
    shutil.copytree(site.directory, fresh, symlinks=True, ignore=shutil.ignore_patterns("seen*"))
    from registry.release import rotate_root

    rotate_root(reg, old, new, add_public=[co.owner_public_pem], promote_threshold=2)
    publish(reg, locked, new, 2, parent=1)  # sealed and signed by the new key only
    assert site.pull("2").version == 2  # the site walked root v1 -> v2 from its owner.pub
    assert (site.directory / "trust" / "root.json").exists()
    with pytest.raises(TrustError, match="needs 2"):
        reg.promote(2, owner=new)
    reg.promote(2, owner=new, co_signers=[co])
    assert Site(fresh).pull().version == 2  # production via the 2-key promotion
    with pytest.raises(TrustError, match="not in root"):
        reg.sign_timestamp(old)  # the rotated-out key signs nothing any more


def test_snapshot_shards_chain_and_spec1_migration(tmp_path, locked, monkeypatch):
    """Versions beyond the heads come from hash-chained shards (tamper one: refused, nothing
    installed); a spec-1 timestamp is refused in one line until the owner re-signs it."""
    from registry import chain, release
    from registry import trust_io as IO
    from registry.errors import IntegrityError

    monkeypatch.setattr(T, "SHARD_SIZE", 1)  # every version starts a shard: a 3-shard chain
    uri, loc = embedded_uris(tmp_path / "reg")
    reg = KeyRegistry(uri, "shards", artifact_location=loc)
    owner = OwnerKeyring.init(tmp_path / "owner")
    site = Site.init(tmp_path / "site", site_id="s", tracking_uri=uri, model_name="shards",
                     owner_public_pem=owner.owner_public_pem)  # fmt: skip
    owner.add_site("s", site.public_key_pem)
    reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    for v in (1, 2, 3):
        publish(reg, locked, owner, v, **({"parent": v - 1} if v > 1 else {}))
    anchor = T.anchor_root("shards", owner.owner_public_pem)
    _, ts, root, run_id = IO.newest_timestamp(KeyRegistry(uri, "shards"), anchor)
    assert (ts.count, ts.latest, sorted(ts.heads)) == (3, 3, ["3"])
    shards = list(IO.iter_shards(KeyRegistry(uri, "shards"), ts))
    assert [s.shard for s in shards] == [2, 1, 0] and shards[-1].prev is None
    fresh = tmp_path / "fresh"
    shutil.copytree(site.directory, fresh, symlinks=True)
    assert site.pull("1").version == 1  # found two shards down the chain
    assert site.installed()["targets_sha256"] == shards[-1].versions["1"].sha256
    # The oldest shard altered in the store: its sha256 no longer matches the chain.
    oldest = shards[1].prev  # shard 0, as shard 1 names it
    path = next(p for p in (tmp_path / "reg").rglob(oldest.path.split("/")[-1]))
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"shard":0', b'"shard":7'))
    with pytest.raises(IntegrityError, match="tampered"):
        Site(fresh).pull("1")
    assert Site(fresh).installed() is None
    path.write_bytes(good)
    # A registry signed by an older adaloc: one timestamp listing every version (spec 1).
    old = {
        "_type": "timestamp", "spec": 1, "model": "shards", "counter": ts.counter + 1,
        "expires": T.iso(ts.expires), "root_version": 1, "aliases": {}, "promotion": None,
        "versions": {v: e.model_dump() for v, e in IO.all_entries(reg, ts).items()},
    }  # fmt: skip
    data = T.canonical(T.sign(old, [release.signing_key(owner)]))
    chain.upload(reg, run_id, IO.TRUST_DIR, IO.TIMESTAMP_FILE, data)
    (tmp_path / "owner" / release.LOCAL_TIMESTAMP).write_bytes(data)
    with pytest.raises(TrustError, match="spec 1") as err:
        Site(fresh).pull("2")
    assert "\n" not in str(err.value) and "sign-timestamp" in str(err.value)
    reg.sign_timestamp(owner)  # migrates: the old list becomes shards under a new timestamp
    r = Site(fresh).pull("2")
    assert (r.version, r.model_sha256) == (2, locked.model_sha256[2])
    _, ts2, _, _ = IO.newest_timestamp(KeyRegistry(uri, "shards"), anchor)
    assert ts2.counter > ts.counter + 1 and sorted(IO.all_entries(reg, ts2), key=int) == [
        "1", "2", "3",
    ]  # fmt: skip
