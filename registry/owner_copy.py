"""The owner's copy of a key version, opened from the registry (MLflow + S3), not a folder.

Every key version is sealed for the owner's X25519 recipient key beside the sites, so any
worker holding the owner's secrets opens the parent key of an update from what every machine
sees. The blob is trusted like a site trusts it: the owner-signed timestamp lists the
version's targets record, which names the sealed blob's length and sha256; the blob's own
owner signature and header must agree with it. Local key files are only a cache.
"""

from __future__ import annotations

from registry import trust_io
from registry.errors import NotAuthorizedError
from registry.keyring import OWNER_RECIPIENT_ID, OwnerKeyring
from registry.sealing import read_header
from registry.signed_open import open_against_targets

SEALED_ENTRY = "key.sealed"


def signed_targets(reg, owner: OwnerKeyring, version: int):
    """(owner-signed targets record of key version ``version``, the root that verified it)."""
    from registry import release

    root, _ = release.current_root(reg, owner)
    _, ts, root, _ = trust_io.newest_timestamp(reg, root)
    return trust_io.read_targets(reg, ts, root, version), root


def open_owner_copy(reg, owner: OwnerKeyring, version: int):
    """(adaloc Key, token bytes or None) of key version ``version``, opened with the owner's
    recipient key after checking the blob against the signed targets record.

    NotAuthorizedError (one line) for a version published before owner sealing.
    """
    tg, root = signed_targets(reg, owner, version)
    entry = tg.files[SEALED_ENTRY]
    blob = trust_io.read_artifact(
        reg,
        entry.run_id,
        entry.path,
        max_bytes=entry.length,
        sha256=entry.sha256,
        length=entry.length,
        label=f"sealed key version {version} (owner copy)",
    )
    header = read_header(blob)
    if OWNER_RECIPIENT_ID not in header.site_ids():
        raise NotAuthorizedError(
            f"key version {version} of {reg.model_name!r} was published before owner sealing, "
            "so the registry holds no owner copy; run this flow where the owner's key cache "
            f"(OWNER_DIR/keys/key-v{version}.safetensors) is, or publish a new version there"
        )
    # The fingerprint picks the keyring's own recipient key or one a rotation retired into it.
    fingerprint = next(r for r in header.recipients if r["site_id"] == OWNER_RECIPIENT_ID)
    key, parts = open_against_targets(
        blob,
        tg,
        root,
        recipient_id=OWNER_RECIPIENT_ID,
        private_key=owner.recipient_key_for(str(fingerprint.get("fingerprint", ""))),
    )
    return key, parts.get("token")
