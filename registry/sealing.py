"""Sealed key versions: AES-256-GCM under a fresh data key, wrapped per site, owner-signed.

Layout of a sealed blob (all integers big-endian)::

    MAGIC (16 B) | header length (u32) | header JSON | ciphertext | Ed25519 signature (64 B)

The header JSON is the AEAD associated data of the ciphertext and carries the per-site
wrapped data keys, so neither can be swapped; the owner's signature covers every byte
before it (the *body*). Format 2 (``MAGIC`` ends in 2, what :func:`seal` writes) signs
``SIG_CONTEXT + sha256(body)`` rather than the body itself: Ed25519 hashes its message with
SHA-512 (6 ms for a 2 MB ResNet-18 key, on the update's critical path), while the body's
sha256 is computed as the blob streams in (:class:`StreamDigest`), so checking the
signature costs one small verify; its strength is SHA-256's collision resistance, the same
that the signed targets' file hashes rest on. Format 1 blobs (the body signed as is) are
still read. Only primitives from ``cryptography`` are used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from registry.errors import BadFileError, IntegrityError, NotAuthorizedError, SignatureError

# Key files moved to registry.keyfiles; re-exported here for existing callers.
from registry.keyfiles import (  # noqa: F401
    OWNER_PRIVATE_FILE,
    OWNER_PUBLIC_FILE,
    PASSPHRASE_ENV,
    PASSPHRASE_FILE_ENV,
    SITE_PRIVATE_FILE,
    SITE_PUBLIC_FILE,
    _public_pem,
    generate_owner_keys,
    generate_site_keys,
    key_fingerprint,
    load_private_key,
    load_public_key,
    passphrase_from_env,
    public_pem_of,
)

MAGIC_V1 = b"ADALOC-SEALED\x00\x00\x01"
MAGIC = b"ADALOC-SEALED\x00\x00\x02"  # what seal() writes
SEAL_FORMAT = 2
SIG_CONTEXT = b"adaloc/sealing/v2/body-sha256\x00"  # domain of a format-2 signature
SIGNATURE_BYTES = 64
_WRAP_INFO = b"adaloc/sealing/v1/wrap"
_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class SealedHeader:
    """The authenticated, unencrypted part of a sealed key version."""

    key_version: int
    parent: int | None
    base_sha256: str
    model_sha256: str | None
    owner: str
    parts: list[dict]
    recipients: list[dict]
    nonce: str
    format: int = SEAL_FORMAT
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> SealedHeader:
        """Build from the decoded header JSON; unknown fields land in ``extra``.

        Every field's type is checked: IntegrityError names the first bad one.
        """
        if not isinstance(d, dict):
            raise IntegrityError(f"sealed header is a JSON {type(d).__name__}, not an object")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = sorted(k for k in ("key_version", "base_sha256", "owner", "nonce") if k not in d)
        if missing:
            raise IntegrityError(
                f"sealed header lacks {missing}; the artifact is not a key version"
            )
        kwargs = {k: d.get(k) for k in known if k in d}
        kwargs.setdefault("parent", None)
        kwargs.setdefault("model_sha256", None)
        kwargs.setdefault("parts", [])
        kwargs.setdefault("recipients", [])
        kwargs.setdefault("format", SEAL_FORMAT)
        _check_header(kwargs)
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in known})

    def site_ids(self) -> list[str]:
        """Site ids the data key was wrapped for."""
        return [r["site_id"] for r in self.recipients]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(h: dict) -> None:
    """Raise IntegrityError unless every header field has the type the reader relies on."""
    problems = []
    if not _is_int(h["key_version"]) or h["key_version"] < 1:
        problems.append(f"key_version={h['key_version']!r}")
    if h["parent"] is not None and not _is_int(h["parent"]):
        problems.append(f"parent={h['parent']!r}")
    for name in ("base_sha256", "owner", "nonce"):
        if not isinstance(h[name], str):
            problems.append(f"{name} is a {type(h[name]).__name__}")
    if h["model_sha256"] is not None and not isinstance(h["model_sha256"], str):
        problems.append("model_sha256 is not a string")
    if not _is_int(h["format"]):
        problems.append(f"format={h['format']!r}")
    parts, recipients = h["parts"], h["recipients"]
    if not isinstance(parts, list) or not all(
        isinstance(p, dict)
        and isinstance(p.get("name"), str)
        and _is_int(p.get("size"))
        and p["size"] >= 0
        for p in parts
    ):
        problems.append("parts is not a list of {name, size >= 0}")
    fields_ = ("site_id", "fingerprint", "ephemeral", "nonce", "wrapped")
    if not isinstance(recipients, list) or not all(
        isinstance(r, dict) and all(isinstance(r.get(f), str) for f in fields_) for r in recipients
    ):
        problems.append(f"recipients is not a list of {{{', '.join(fields_)}}} strings")
    if problems:
        raise IntegrityError(f"sealed header has bad fields: {'; '.join(problems)} (tampered?)")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _wrap_kek(shared: bytes, ephemeral_raw: bytes, site_raw: bytes, site_id: str) -> bytes:
    # Binding both public keys and the site id into HKDF stops re-targeting a wrapped key.
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral_raw + site_raw,
        info=_WRAP_INFO + b"|" + site_id.encode(),
    )
    return hkdf.derive(shared)


def _raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(
    parts: dict[str, bytes],
    *,
    header: dict,
    recipients: dict[str, bytes],
    signing_key: Ed25519PrivateKey,
) -> bytes:
    """Encrypt ``parts`` for ``recipients`` (site id -> X25519 public PEM) and sign the result."""
    if not recipients:
        raise NotAuthorizedError(
            "no authorised site to seal for; add one with `adaloc keys site-add`"
        )
    data_key = AESGCM.generate_key(bit_length=256)
    wrapped = []
    for site_id, pem in sorted(recipients.items()):
        site_pub = serialization.load_pem_public_key(pem)
        if not isinstance(site_pub, X25519PublicKey):
            raise NotAuthorizedError(f"site {site_id!r} public key is not X25519")
        ephemeral = X25519PrivateKey.generate()
        kek = _wrap_kek(
            ephemeral.exchange(site_pub), _raw(ephemeral.public_key()), _raw(site_pub), site_id
        )
        nonce = os.urandom(12)
        wrapped.append(
            {
                "site_id": site_id,
                "fingerprint": key_fingerprint(pem),
                "ephemeral": _b64(_raw(ephemeral.public_key())),
                "nonce": _b64(nonce),
                "wrapped": _b64(AESGCM(kek).encrypt(nonce, data_key, site_id.encode())),
            }
        )
    nonce = os.urandom(12)
    full = dict(header)
    full.update(
        format=SEAL_FORMAT,
        owner=key_fingerprint(public_pem_of(signing_key)),
        parts=[{"name": name, "size": len(data)} for name, data in parts.items()],
        recipients=wrapped,
        nonce=_b64(nonce),
    )
    header_bytes = json.dumps(full, sort_keys=True, separators=(",", ":")).encode()
    ciphertext = AESGCM(data_key).encrypt(nonce, b"".join(parts.values()), header_bytes)
    body = MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes + ciphertext
    return body + signing_key.sign(SIG_CONTEXT + hashlib.sha256(body).digest())


class StreamDigest:
    """sha256 of a sealed blob and of its body (all but the trailing signature), fed chunk by
    chunk as it downloads, so neither hash is left for after the last byte."""

    def __init__(self) -> None:
        self.whole, self._body, self._tail, self.length = hashlib.sha256(), hashlib.sha256(), b"", 0

    def update(self, chunk) -> None:
        """Feed the next bytes of the blob."""
        self.whole.update(chunk)
        self.length += len(chunk)
        view = memoryview(chunk).cast("B")
        if len(view) >= SIGNATURE_BYTES:  # the held-back tail is body, the new one may not be
            self._body.update(self._tail)
            self._body.update(view[:-SIGNATURE_BYTES])
            self._tail = bytes(view[-SIGNATURE_BYTES:])
        else:
            data = self._tail + bytes(view)
            self._body.update(data[: max(0, len(data) - SIGNATURE_BYTES)])
            self._tail = data[-SIGNATURE_BYTES:]

    def body_sha256(self) -> bytes:
        """sha256 of the body fed so far (what a format-2 signature covers)."""
        return self._body.digest()


@dataclass(frozen=True)
class _Parts:
    """A blob cut into its fields: views into the caller's bytes, nothing copied."""

    magic: bytes
    body: memoryview
    header_bytes: memoryview
    ciphertext: memoryview
    signature: bytes


def _split(blob) -> _Parts:
    """Cut ``blob`` into its fields (views) or raise IntegrityError."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise IntegrityError(f"sealed key version is a {type(blob).__name__}, not bytes")
    view = memoryview(blob).cast("B")
    n = len(MAGIC)
    magic = bytes(view[:n])
    if len(view) < n + 4 + SIGNATURE_BYTES or magic not in (MAGIC, MAGIC_V1):
        raise IntegrityError("artifact is not a sealed adaloc key version (bad magic or truncated)")
    (hlen,) = struct.unpack(">I", view[n : n + 4])
    if hlen > _MAX_HEADER or n + 4 + hlen > len(view) - SIGNATURE_BYTES:
        raise IntegrityError(f"sealed key version header length {hlen} is out of range (tampered?)")
    body = view[:-SIGNATURE_BYTES]
    return _Parts(magic, body, body[n + 4 : n + 4 + hlen], body[n + 4 + hlen :],
                  bytes(view[-SIGNATURE_BYTES:]))  # fmt: skip


def _header(p: _Parts) -> SealedHeader:
    try:
        data = json.loads(bytes(p.header_bytes))
    except (ValueError, TypeError, RecursionError) as err:
        raise IntegrityError(f"sealed key version header is not valid JSON ({err})") from err
    return SealedHeader.from_dict(data)


def read_header(blob: bytes) -> SealedHeader:
    """Parse the header WITHOUT checking the signature (inspection only)."""
    return _header(_split(blob))


def _verify(p: _Parts, owner_public_pem: bytes, body_sha256: bytes | None) -> SealedHeader:
    try:
        owner = load_public_key(owner_public_pem, Ed25519PublicKey, "the owner public key")
    except BadFileError as err:
        raise SignatureError(f"{err}; check the site's owner.pub") from err
    if p.magic == MAGIC_V1:
        message = p.body
    else:
        message = SIG_CONTEXT + (body_sha256 or hashlib.sha256(p.body).digest())
    try:
        owner.verify(p.signature, message)
    except InvalidSignature as err:
        raise SignatureError(
            "owner signature check failed: the sealed key version was modified or was not "
            f"signed by owner {key_fingerprint(owner_public_pem)}"
        ) from err
    return _header(p)


def verify_sealed(
    blob: bytes, owner_public_pem: bytes, *, body_sha256: bytes | None = None
) -> SealedHeader:
    """Check the owner's Ed25519 signature over header + ciphertext; return the header.

    ``body_sha256``: the body's sha256 when the caller computed it over these very bytes (a
    :class:`StreamDigest` of the download); else it is computed here.
    """
    return _verify(_split(blob), owner_public_pem, body_sha256)


def open_sealed(
    blob: bytes,
    *,
    site_id: str,
    site_private_key: X25519PrivateKey,
    owner_public_pem: bytes,
    body_sha256: bytes | None = None,
) -> tuple[SealedHeader, dict[str, bytes]]:
    """Verify the signature, unwrap the data key for this site and decrypt the parts
    (``body_sha256`` as in :func:`verify_sealed`)."""
    p = _split(blob)
    header = _verify(p, owner_public_pem, body_sha256)
    header_bytes, ciphertext = p.header_bytes, p.ciphertext
    entry = next((r for r in header.recipients if r["site_id"] == site_id), None)
    if entry is None:
        raise NotAuthorizedError(
            f"site {site_id!r} is not a recipient of key version {header.key_version} "
            f"(sealed for {header.site_ids()}): revoked or never added; ask the owner"
        )
    own_pub = site_private_key.public_key()
    if entry["fingerprint"] != key_fingerprint(_public_pem(own_pub)):
        raise NotAuthorizedError(
            f"key version {header.key_version} was sealed for site {site_id!r} with key "
            f"{entry['fingerprint']}, not this site's key {key_fingerprint(_public_pem(own_pub))}"
        )
    try:
        ephemeral = X25519PublicKey.from_public_bytes(_unb64(entry["ephemeral"]))
        kek = _wrap_kek(
            site_private_key.exchange(ephemeral), _raw(ephemeral), _raw(own_pub), site_id
        )
        data_key = AESGCM(kek).decrypt(
            _unb64(entry["nonce"]), _unb64(entry["wrapped"]), site_id.encode()
        )
    except (InvalidTag, ValueError) as err:
        raise NotAuthorizedError(
            f"cannot unwrap the data key of key version {header.key_version} with site "
            f"{site_id!r}'s private key (wrong site key)"
        ) from err
    try:
        plain = AESGCM(data_key).decrypt(_unb64(header.nonce), ciphertext, header_bytes)
    except (InvalidTag, ValueError) as err:
        raise IntegrityError(
            f"key version {header.key_version} failed AEAD authentication (corrupted ciphertext)"
        ) from err
    parts, offset = {}, 0
    for p in header.parts:
        parts[p["name"]] = plain[offset : offset + int(p["size"])]
        offset += int(p["size"])
    if offset != len(plain):
        raise IntegrityError(f"key version {header.key_version} part sizes do not add up")
    return header, parts
