"""The owner's sealed copy: any holder of the owner's keyring opens a key version from the
registry alone; a tampered copy is refused; a version published before owner sealing fails
with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaloc.artifact import encode_key
from registry import KeyRegistry
from registry.errors import IntegrityError, NotAuthorizedError
from registry.keyring import OwnerKeyring
from registry.mlflow_io import embedded_uris
from registry.owner_copy import open_owner_copy
from registry.sealing import generate_site_keys
from tests.registry.conftest import publish


class _KeyringBeforeOwnerSealing(OwnerKeyring):
    """Seals for the sites only, as every keyring did before owner sealing (old registries)."""

    def seal_recipients(self) -> dict[str, bytes]:
        return self.recipients()


@pytest.fixture()
def world(tmp_path, locked):
    owner = OwnerKeyring.init(tmp_path / "owner")
    generate_site_keys(tmp_path / "site")
    owner.add_site("lab", tmp_path / "site" / "site.pub")
    tracking, artifacts = embedded_uris(tmp_path / "reg")[:2]
    reg = KeyRegistry(tracking, "copy", artifact_location=artifacts)
    reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    return reg, owner


def test_owner_copy_opens_from_the_registry_alone(world, locked):
    reg, owner = world
    publish(reg, locked, owner, 1, aliases=("production",))
    publish(reg, locked, owner, 2, aliases=("production",))
    # a fresh registry object: nothing cached from the publication
    fresh = KeyRegistry(reg.tracking_uri, "copy")
    for v in (1, 2):
        key, token = open_owner_copy(fresh, OwnerKeyring(owner.directory), v)
        assert encode_key(key) == encode_key(locked.keys[v]) and token is None
    assert fresh.resolve(2).recipients == ["lab"]  # the owner copy is not shown as a site


def test_version_from_before_owner_sealing_fails_with_one_line(world, locked):
    reg, owner = world
    publish(reg, locked, _KeyringBeforeOwnerSealing(owner.directory), 1)
    with pytest.raises(NotAuthorizedError, match="published before owner sealing") as err:
        open_owner_copy(reg, owner, 1)
    assert "\n" not in str(err.value) and "key-v1.safetensors" in str(err.value)


def test_tampered_owner_copy_is_refused(world, locked, tmp_path):
    reg, owner = world
    kv = publish(reg, locked, owner, 1)
    # a registry writer replaces the sealed blob: its sha256 no longer matches the signed one
    blob = tmp_path / "key.sealed"
    blob.write_bytes(b"ADALOC-SEALED\x00\x00\x01" + b"\x00" * 200)
    reg.client.log_artifact(kv.run_id, str(blob), "key")
    with pytest.raises(IntegrityError):
        open_owner_copy(KeyRegistry(reg.tracking_uri, "copy"), owner, 1)


@pytest.mark.parametrize("passphrase", [None, b"rotated passphrase"])
def test_rotation_keeps_the_owner_copies_openable(tmp_path, locked, world, passphrase, monkeypatch):
    """After a root rotation the new keyring opens the owner copies sealed before it (the
    parent of its first update) with the retired recipient key, and seals new versions for
    its own recipient key only; the carried key is 0600 and encrypted like owner.key."""
    from registry.keyfiles import is_encrypted
    from registry.keyring import RETIRED_RECIPIENTS_DIR
    from registry.release import rotate_root
    from registry.sealing import read_header

    if passphrase:
        monkeypatch.setenv("ADALOC_OWNER_PASSPHRASE", passphrase.decode())
    reg, old = world
    publish(reg, locked, old, 1)
    new = OwnerKeyring.init(tmp_path / "new", passphrase=passphrase)
    new.add_site("lab", tmp_path / "site" / "site.pub")
    rotate_root(reg, old, new)
    carried = list((new.directory / RETIRED_RECIPIENTS_DIR).glob("*.key"))
    assert len(carried) == 1 and carried[0].stat().st_mode & 0o777 == 0o600
    assert is_encrypted(carried[0]) == bool(passphrase)
    kv = publish(reg, locked, new, 2, parent=1)
    fresh = KeyRegistry(reg.tracking_uri, "copy")
    for v in (1, 2):
        key, _ = open_owner_copy(fresh, OwnerKeyring(new.directory), v)
        assert encode_key(key) == encode_key(locked.keys[v])
    blob = fresh.client.download_artifacts(kv.run_id, "key/key.sealed", str(tmp_path / "dl"))
    header = read_header(Path(blob).read_bytes())
    owner_entry = next(r for r in header.recipients if r["site_id"] == "@owner")
    assert owner_entry["fingerprint"] != carried[0].stem  # v2 is sealed for the new key

    # Without the carried key (a keyring rotated by hand) v1's copy fails in one line.
    carried[0].unlink()
    with pytest.raises(NotAuthorizedError, match="does not hold") as err:
        open_owner_copy(fresh, OwnerKeyring(new.directory), 1)
    assert "\n" not in str(err.value)


def test_revoking_rotation_carries_no_recipient_key(tmp_path, locked, world):
    from registry.keyring import RETIRED_RECIPIENTS_DIR
    from registry.release import rotate_root

    reg, old = world
    publish(reg, locked, old, 1)
    new = OwnerKeyring.init(tmp_path / "new")
    new.add_site("lab", tmp_path / "site" / "site.pub")
    rotate_root(reg, old, new, revoke_old=True)  # the old folder is taken to be compromised
    assert not (new.directory / RETIRED_RECIPIENTS_DIR).exists()
