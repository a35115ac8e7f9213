"""The owner's sealed copy: any holder of the owner's keyring opens a key version from the
registry alone; a tampered copy is refused; a version published before owner sealing fails
with one clear line."""

from __future__ import annotations

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
