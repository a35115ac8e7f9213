"""Sealing and the owner's keyring: confidentiality per site, tamper evidence, revocation."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from registry.errors import IntegrityError, NotAuthorizedError, RegistryError, SignatureError
from registry.keyring import OWNER_RECIPIENT_ID, OwnerKeyring
from registry.sealing import (
    MAGIC,
    generate_site_keys,
    load_private_key,
    open_sealed,
    read_header,
    verify_sealed,
)

HEADER = {"key_version": 1, "parent": None, "base_sha256": "ab" * 32, "model_sha256": None}


@pytest.fixture
def world(tmp_path):
    owner = OwnerKeyring.init(tmp_path / "owner")
    for name in ("a", "b"):
        generate_site_keys(tmp_path / name)
        owner.add_site(name, tmp_path / name / "site.pub")
    return owner, tmp_path


def _open(blob, world, site="a", key_dir=None):
    owner, root = world
    return open_sealed(
        blob,
        site_id=site,
        site_private_key=load_private_key(root / (key_dir or site) / "site.key"),
        owner_public_pem=owner.owner_public_pem,
    )


def test_private_keys_are_0600(world):
    owner, root = world
    for path in (root / "owner" / "owner.key", root / "a" / "site.key"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "a" / "site.pub").st_mode) == 0o644


def test_roundtrip_every_site_and_parts(world):
    owner, _ = world
    parts = {"key": os.urandom(5000), "token": b'{"pattern": [1, 0]}'}
    blob = owner.seal(parts, HEADER)
    assert parts["key"] not in blob and parts["token"] not in blob
    for site in ("a", "b"):
        header, got = _open(blob, world, site)
        assert got == parts and header.key_version == 1
    # the owner's own copy: sealed for the owner's recipient key, under an id no site can take
    assert read_header(blob).site_ids() == [OWNER_RECIPIENT_ID, "a", "b"]
    header, got = open_sealed(
        blob,
        site_id=OWNER_RECIPIENT_ID,
        site_private_key=owner.recipient_key(),
        owner_public_pem=owner.owner_public_pem,
    )
    assert got == parts
    with pytest.raises(RegistryError, match="site id"):
        owner.add_site(OWNER_RECIPIENT_ID, owner.directory.parent / "a" / "site.pub")


def test_owner_recipient_key_is_encrypted_like_the_signing_key(tmp_path, monkeypatch):
    monkeypatch.delenv("ADALOC_OWNER_PASSPHRASE", raising=False)
    monkeypatch.delenv("ADALOC_OWNER_PASSPHRASE_FILE", raising=False)
    owner = OwnerKeyring.init(tmp_path / "o", passphrase=b"correct horse")
    for name in ("owner.key", "owner-recipient.key"):
        path = tmp_path / "o" / name
        assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert isinstance(owner.recipient_key(), X25519PrivateKey)
    with pytest.raises(RegistryError, match="encrypted; set ADALOC_OWNER_PASSPHRASE"):
        OwnerKeyring(tmp_path / "o").recipient_key()
    monkeypatch.setenv("ADALOC_OWNER_PASSPHRASE", "wrong")
    with pytest.raises(RegistryError, match="wrong passphrase"):
        OwnerKeyring(tmp_path / "o").recipient_key()


def test_keyring_from_before_owner_sealing_gains_a_recipient_key(world):
    owner, root = world
    for name in ("owner-recipient.key", "owner-recipient.pub"):
        (root / "owner" / name).unlink()  # a keyring made before owner sealing
    blob = owner.seal({"key": b"k" * 64}, HEADER)
    assert (root / "owner" / "owner-recipient.key").exists()
    assert OWNER_RECIPIENT_ID in read_header(blob).site_ids()


@pytest.mark.parametrize("where", ["magic", "length", "header", "ciphertext", "signature"])
def test_any_tampered_byte_is_refused(world, where):
    owner, _ = world
    blob = bytearray(owner.seal({"key": os.urandom(2000)}, HEADER))
    hlen = int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 4], "big")
    pos = {
        "magic": 3,
        "length": len(MAGIC) + 3,
        "header": len(MAGIC) + 4 + hlen // 2,
        "ciphertext": len(MAGIC) + 4 + hlen + 100,
        "signature": len(blob) - 5,
    }[where]
    blob[pos] ^= 0x01
    with pytest.raises(IntegrityError):
        _open(bytes(blob), world)


def test_signature_from_another_owner_is_refused(world, tmp_path):
    owner, _ = world
    other = OwnerKeyring.init(tmp_path / "other")
    other.add_site("a", tmp_path / "a" / "site.pub")
    blob = other.seal({"key": b"k" * 100}, HEADER)
    with pytest.raises(SignatureError, match="signature check failed"):
        verify_sealed(blob, owner.owner_public_pem)


def test_wrong_site_key_is_refused(world):
    owner, _ = world
    blob = owner.seal({"key": b"k" * 100}, HEADER)
    with pytest.raises(NotAuthorizedError, match="not this site's key"):
        _open(blob, world, site="a", key_dir="b")


def test_revoked_site_cannot_open_later_versions(world):
    owner, _ = world
    before = owner.seal({"key": b"old" * 10}, HEADER)
    owner.revoke_site("b")
    after = owner.seal({"key": b"new" * 10}, {**HEADER, "key_version": 2, "parent": 1})
    assert _open(before, world, "b")[1]["key"] == b"old" * 10  # cannot be undone
    with pytest.raises(NotAuthorizedError, match="not a recipient of key version 2"):
        _open(after, world, "b")
    assert _open(after, world, "a")[1]["key"] == b"new" * 10
    assert [s.site_id for s in owner.sites(include_revoked=False)] == ["a"]
    assert owner.sites()[1].revoked


def test_keyring_rejects_bad_input(world, tmp_path):
    owner, root = world
    with pytest.raises(RegistryError, match="already exists"):
        owner.add_site("a", root / "a" / "site.pub")
    with pytest.raises(RegistryError, match="expected X25519"):
        owner.add_site("c", root / "owner" / "owner.pub")
    with pytest.raises(RegistryError, match="invalid"):
        owner.add_site("bad id!", root / "a" / "site.pub")
    with pytest.raises(FileExistsError):
        OwnerKeyring.init(root / "owner")


def test_idempotency_key_is_deterministic_and_keyed(world, tmp_path):
    owner, _ = world
    other = OwnerKeyring.init(tmp_path / "other")
    assert owner.idempotency_key("x", b"key") == owner.idempotency_key("x", b"key")
    assert owner.idempotency_key("x", b"key") != owner.idempotency_key("x", b"kez")
    assert owner.idempotency_key("x", b"key") != other.idempotency_key("x", b"key")


def test_encrypted_owner_key_from_env_or_file(tmp_path, monkeypatch):
    """`keys owner-init --passphrase-file`: owner.key is encrypted, 0600, and flows open it
    from ADALOC_OWNER_PASSPHRASE(_FILE); without (or with a wrong) passphrase: one line."""
    from tests.registry.conftest import run_cli

    (tmp_path / "pass.txt").write_text("correct horse\n")
    owner_dir = tmp_path / "owner"
    res = run_cli("keys", "owner-init", "--owner-dir", owner_dir,
                  "--passphrase-file", tmp_path / "pass.txt", "--json")  # fmt: skip
    assert res.exit_code == 0 and json.loads(res.stdout)["encrypted"] is True, res.output
    pem = (owner_dir / "owner.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(os.stat(owner_dir / "owner.key").st_mode) == 0o600
    monkeypatch.delenv("ADALOC_OWNER_PASSPHRASE", raising=False)
    monkeypatch.delenv("ADALOC_OWNER_PASSPHRASE_FILE", raising=False)
    res = run_cli("keys", "owner-check", "--owner-dir", owner_dir)
    assert res.exit_code == 1 and "is encrypted; set ADALOC_OWNER_PASSPHRASE" in res.stderr
    monkeypatch.setenv("ADALOC_OWNER_PASSPHRASE", "wrong")
    res = run_cli("keys", "owner-check", "--owner-dir", owner_dir)
    assert res.exit_code == 1 and "wrong passphrase" in res.stderr
    monkeypatch.delenv("ADALOC_OWNER_PASSPHRASE")
    monkeypatch.setenv("ADALOC_OWNER_PASSPHRASE_FILE", str(tmp_path / "pass.txt"))
    res = run_cli("keys", "owner-check", "--owner-dir", owner_dir, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["encrypted"] is True, res.output
    site = X25519PrivateKey.generate().public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    keyring = OwnerKeyring(owner_dir)
    keyring.add_site("a", site.public_bytes(serialization.Encoding.PEM, spki))
    blob = keyring.seal({"key": b"k" * 8}, HEADER)  # the flows' path: key from the env file
    assert verify_sealed(blob, keyring.owner_public_pem).key_version == 1
    assert OwnerKeyring(owner_dir, passphrase=b"correct horse").signing_key() is not None


def test_format_1_blobs_still_open_and_format_2_signs_the_body_hash(world):
    """Format 2 signs SIG_CONTEXT + sha256(body); blobs sealed before it (format 1: the body
    signed as is) still open, and neither signature passes for the other format."""
    import hashlib

    from registry.sealing import MAGIC_V1, SIG_CONTEXT, SIGNATURE_BYTES

    owner, _ = world
    parts = {"key": os.urandom(3000)}
    blob = owner.seal(parts, HEADER)
    assert blob.startswith(MAGIC)
    body = blob[:-SIGNATURE_BYTES]
    signer = owner.signing_key()
    signer.public_key().verify(blob[-SIGNATURE_BYTES:], SIG_CONTEXT + hashlib.sha256(body).digest())
    v1_body = MAGIC_V1 + body[len(MAGIC) :]
    v1 = v1_body + signer.sign(v1_body)
    assert _open(v1, world)[1] == parts
    relabelled = v1_body + blob[-SIGNATURE_BYTES:]  # a format-2 signature under a v1 magic
    with pytest.raises(SignatureError):
        _open(relabelled, world)


def test_a_body_hash_from_the_download_must_be_of_these_bytes(world):
    """open_sealed(body_sha256=) takes the hash a StreamDigest computed as the blob came in;
    a hash of other bytes fails the signature, as a changed byte would."""
    from registry.sealing import StreamDigest

    owner, _ = world
    blob = owner.seal({"key": os.urandom(3000)}, HEADER)
    digest = StreamDigest()
    for i in range(0, len(blob), 700):  # chunks that cut the signature apart
        digest.update(blob[i : i + 700])
    assert digest.length == len(blob)
    ok = _open_with(blob, world, digest.body_sha256())
    assert ok[0].key_version == 1
    with pytest.raises(SignatureError):
        _open_with(blob, world, bytes(32))


def _open_with(blob, world, body_sha256):
    owner, root = world
    return open_sealed(
        blob,
        site_id="a",
        site_private_key=load_private_key(root / "a" / "site.key"),
        owner_public_pem=owner.owner_public_pem,
        body_sha256=body_sha256,
    )
