"""Open a sealed key version as the signed records allow: one check for sites and the owner.

The transport can lie, so the blob's signer must be a seal key of the verified root, and its
header (version, base, model) and token presence must match the owner-signed targets record
before the decoded key is used. Sites and the owner's registry copy both call this.
"""

from __future__ import annotations

from adaloc.formats import sha256_bytes
from registry import trust as T
from registry.errors import IntegrityError, TrustError
from registry.sealing import open_sealed, read_header
from registry.workers import worker


def open_against_targets(
    blob: bytes,
    tg: T.TargetsSigned,
    root: T.RootSigned,
    *,
    recipient_id: str,
    private_key,
    body_sha256: bytes | None = None,
    digests: dict[str, str] | None = None,
    on_parts=None,
) -> tuple[object, dict[str, bytes]]:
    """(adaloc Key, decrypted parts) of ``blob`` for ``recipient_id``; IntegrityError if the
    blob disagrees with the signed targets, TrustError if the root does not name its signer.
    ``body_sha256``: see ``sealing.verify_sealed`` (hashed as the blob downloaded).
    ``digests``: filled with the sha256 of each decrypted part, hashed on a second core
    while the key decodes (hashlib drops the GIL), for a caller that records them.
    ``on_parts``: called with the parts once they are authenticated (AEAD under a signer of
    the root, header matching the targets), before the key decodes: a site starts writing
    its install there. The decode's layout checks can still refuse the key after it."""
    from adaloc.artifact import decode_key
    from adaloc.errors import KeyFormatError

    signer = read_header(blob).owner  # unverified: it only picks the key open_sealed checks
    pem = T.seal_keys(root).get(signer)
    if pem is None:
        raise TrustError(
            f"key version {tg.key_version} is sealed by key {signer}, which the "
            f"owner's root v{root.version} does not name (revoked?)"
        )
    header, parts = open_sealed(
        blob,
        site_id=recipient_id,
        owner_public_pem=pem.encode(),
        site_private_key=private_key,
        body_sha256=body_sha256,
    )
    if (
        (header.key_version, header.base_sha256) != (tg.key_version, tg.base_sha256)
        or (header.model_sha256 or "") != tg.model_sha256
        or header.extra.get("model") not in (None, tg.model)
    ):
        raise IntegrityError(
            f"sealed key says version {header.key_version} / base {header.base_sha256[:12]}, "
            f"the signed targets say {tg.key_version} / {tg.base_sha256[:12]}: mixed records"
        )
    if ("token" in parts) != tg.token:
        raise IntegrityError(f"key version {tg.key_version}: token presence differs from targets")
    if on_parts is not None:
        on_parts(parts)
    hashing = None
    if digests is not None:  # on a second core while the key decodes
        hashing = worker("hash").submit(lambda: {n: sha256_bytes(b) for n, b in parts.items()})
    try:
        key = decode_key(parts["key"], checksum=False)  # (AEAD-authenticated, signed header)
    except KeyFormatError as err:
        raise IntegrityError(f"key version {tg.key_version}: {err}") from err
    finally:
        if hashing is not None:
            digests.update(hashing.result())
    if key.version != tg.key_version or key.base_sha256 != tg.base_sha256:
        raise IntegrityError(
            f"key artifact says version {key.version}, targets say {tg.key_version}"
        )
    return key, parts
