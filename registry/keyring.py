"""The owner's keyring: signing key plus the list of authorised (and revoked) sites.

Revocation is forward-only by construction: a key version is sealed for the sites that are
authorised when it is published, so a revoked site holds no wrapped data key for any later
version. Versions it already received stay readable to it (that cannot be undone).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from registry.errors import BadFileError, NotAuthorizedError, NotFoundError, RegistryError
from registry.fsutil import (
    PRIVATE_FILE_MODE,
    atomic_write_bytes,
    atomic_write_json,
    private_dir,
    read_json,
)
from registry.keyfiles import (
    OWNER_PRIVATE_FILE,
    OWNER_PUBLIC_FILE,
    OWNER_RECIPIENT_FILE,
    OWNER_RECIPIENT_PUBLIC_FILE,
    _private_pem,
    _public_pem,
    generate_owner_keys,
    generate_owner_recipient,
    is_encrypted,
    key_fingerprint,
    load_private_key,
    load_public_key,
    passphrase_from_env,
)
from registry.sealing import seal

SITES_FILE = "sites.json"
# Recipient keys of earlier keyrings, carried over by a root rotation: they open the owner's
# copies sealed before it and seal nothing (``<fingerprint>.key``, 0600, in a 0700 folder).
RETIRED_RECIPIENTS_DIR = "owner-recipient-retired"
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
# The owner's own recipient id in a sealed header: not a valid site id, so no site can take it.
OWNER_RECIPIENT_ID = "@owner"
SITES_FORMAT_VERSION = 1
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class SiteEntry:
    """One site the owner seals key versions for (unless revoked)."""

    site_id: str
    fingerprint: str
    public_key: str
    added_at: str
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        """True once the site has been revoked."""
        return self.revoked_at is not None

    def to_dict(self, *, with_key: bool = True) -> dict:
        """JSON-friendly dict; ``with_key=False`` drops the PEM for listings."""
        d = asdict(self)
        if not with_key:
            d.pop("public_key")
        return d


def _entry(raw, path: Path, i: int) -> SiteEntry:
    """One sites.json entry, type-checked (a hand-edited or corrupt file names the entry)."""
    need = ("site_id", "fingerprint", "public_key", "added_at")
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in need):
        raise BadFileError(
            f"{path}: site entry #{i} is not an object with string {', '.join(need)}; "
            "restore sites.json from a backup"
        )
    revoked = raw.get("revoked_at")
    if revoked is not None and not isinstance(revoked, str):
        raise BadFileError(f"{path}: site entry #{i} has revoked_at={revoked!r}")
    return SiteEntry(*(raw[k] for k in need), revoked_at=revoked)


class OwnerKeyring:
    """Folder holding owner.key (0600, optionally passphrase-encrypted), owner.pub, sites.json.

    ``passphrase`` unlocks an encrypted owner.key; without it the key's passphrase is read
    from ``ADALOC_OWNER_PASSPHRASE`` / ``ADALOC_OWNER_PASSPHRASE_FILE`` when it is needed.
    """

    def __init__(self, directory: str | Path, *, passphrase: bytes | None = None):
        self.directory = Path(directory)
        self._passphrase = passphrase

    @classmethod
    def init(
        cls, directory: str | Path, *, overwrite: bool = False, passphrase: bytes | None = None
    ) -> OwnerKeyring:
        """Create owner keys (encrypted with ``passphrase`` if given) and an empty site list."""
        keyring = cls(directory, passphrase=passphrase)
        generate_owner_keys(keyring.directory, overwrite=overwrite, passphrase=passphrase)
        if overwrite or not keyring._sites_path.exists():
            keyring._save([])
        return keyring

    def signing_key(self) -> Ed25519PrivateKey:
        """The owner's Ed25519 signing key (decrypted with the passphrase when encrypted)."""
        return load_private_key(
            self.directory / OWNER_PRIVATE_FILE,
            Ed25519PrivateKey,
            passphrase=self._passphrase_or_env(),
        )

    def _passphrase_or_env(self) -> bytes | None:
        return self._passphrase or passphrase_from_env()

    def recipient_key(self) -> X25519PrivateKey:
        """The owner's X25519 recipient key, which opens the owner's copy of a key version."""
        return load_private_key(
            self.directory / OWNER_RECIPIENT_FILE,
            X25519PrivateKey,
            passphrase=self._passphrase_or_env(),
        )

    def recipient_public_pem(self) -> bytes:
        """The owner recipient's public PEM; created on first use for a keyring made before
        owner sealing (encrypted like owner.key), so every new key version has an owner copy."""
        path = self.directory / OWNER_RECIPIENT_PUBLIC_FILE
        if not (self.directory / OWNER_RECIPIENT_FILE).exists():
            encrypted = is_encrypted(self.directory / OWNER_PRIVATE_FILE)
            self.signing_key()  # fail here (one line) if the passphrase is missing or wrong
            generate_owner_recipient(
                self.directory, passphrase=self._passphrase_or_env() if encrypted else None
            )
        try:
            pem = path.read_bytes()
        except OSError as err:
            raise BadFileError(f"owner recipient public key {path} is not readable: {err}") from err
        load_public_key(pem, X25519PublicKey, f"owner recipient public key {path}")
        return pem

    def recipient_key_for(self, fingerprint: str) -> X25519PrivateKey:
        """The recipient key with public ``fingerprint``: this keyring's own, or one a root
        rotation retired into it (it opens the owner's copies sealed before the rotation)."""
        own = self.recipient_key()
        if key_fingerprint(_public_pem(own.public_key())) == fingerprint:
            return own
        path = self.directory / RETIRED_RECIPIENTS_DIR / f"{fingerprint}.key"
        if not _FINGERPRINT.match(fingerprint) or not path.exists():
            raise NotAuthorizedError(
                f"the owner copy is sealed for recipient key {fingerprint!r}, which keyring "
                f"{self.directory} does not hold (a rotation with --revoke, or a keyring "
                f"rotated by hand: copy the old owner-recipient.key to {path})"
            )
        return load_private_key(path, X25519PrivateKey, passphrase=self._passphrase_or_env())

    def retire_recipients_from(self, old: OwnerKeyring) -> list[str]:
        """Keep ``old``'s recipient key (and the ones it had retired) in this keyring for
        opening only, encrypted like this keyring's owner.key; returns their fingerprints.

        Called by a root rotation so the new keyring still opens the parent of its first
        update. A keyring without a recipient key (made before owner sealing) carries none.
        """
        keys = []
        if (old.directory / OWNER_RECIPIENT_FILE).exists():
            keys.append(old.recipient_key())
        retired_dir = old.directory / RETIRED_RECIPIENTS_DIR
        for path in sorted(retired_dir.glob("*.key")) if retired_dir.is_dir() else ():
            keys.append(
                load_private_key(path, X25519PrivateKey, passphrase=old._passphrase_or_env())
            )
        own = self.directory / OWNER_RECIPIENT_FILE
        own_fp = (
            key_fingerprint(_public_pem(self.recipient_key().public_key())) if own.exists() else ""
        )
        passphrase = (
            self._passphrase_or_env() if is_encrypted(self.directory / OWNER_PRIVATE_FILE) else None
        )
        if passphrase is not None:
            self.signing_key()  # a wrong passphrase fails here, before any file is written
        done = []
        for key in keys:
            fp = key_fingerprint(_public_pem(key.public_key()))
            if fp == own_fp or fp in done:
                continue
            folder = private_dir(self.directory / RETIRED_RECIPIENTS_DIR)
            atomic_write_bytes(
                folder / f"{fp}.key", _private_pem(key, passphrase), mode=PRIVATE_FILE_MODE
            )
            done.append(fp)
        return done

    @property
    def _sites_path(self) -> Path:
        return self.directory / SITES_FILE

    @property
    def owner_public_pem(self) -> bytes:
        """The owner's Ed25519 public key (PEM) that sites verify signatures with."""
        path = self.directory / OWNER_PUBLIC_FILE
        try:
            pem = path.read_bytes()
        except FileNotFoundError as err:
            raise NotFoundError(
                f"owner public key {path} not found; run `adaloc keys owner-init {self.directory}`"
            ) from err
        except OSError as err:
            raise BadFileError(f"owner public key {path} is not readable: {err}") from err
        load_public_key(pem, Ed25519PublicKey, f"owner public key {path}")
        return pem

    def _load(self) -> list[SiteEntry]:
        data = read_json(self._sites_path)
        if data is None:
            raise NotFoundError(
                f"{self._sites_path} not found; run `adaloc keys owner-init {self.directory}`"
            )
        sites = data.get("sites")
        if data.get("format_version") != SITES_FORMAT_VERSION or not isinstance(sites, list):
            raise BadFileError(
                f"{self._sites_path} is not a sites list (format_version "
                f"{SITES_FORMAT_VERSION} with a 'sites' array); restore it from a backup"
            )
        return [_entry(raw, self._sites_path, i) for i, raw in enumerate(sites)]

    def _save(self, sites: list[SiteEntry]) -> None:
        atomic_write_json(
            self._sites_path,
            {"format_version": SITES_FORMAT_VERSION, "sites": [s.to_dict() for s in sites]},
        )

    def sites(self, *, include_revoked: bool = True) -> list[SiteEntry]:
        """All sites, in the order they were added."""
        return [s for s in self._load() if include_revoked or not s.revoked]

    def add_site(self, site_id: str, public_key: bytes | str | Path) -> SiteEntry:
        """Authorise ``site_id`` with its X25519 public key (PEM bytes or a path to site.pub)."""
        if not _SITE_ID.match(site_id):
            raise RegistryError(
                f"site id {site_id!r} is invalid; use 1-64 letters, digits, '.', '_' or '-'"
            )
        if isinstance(public_key, bytes):
            pem, what = public_key, f"public key for site {site_id!r}"
        else:
            what = f"public key for site {site_id!r} ({public_key})"
            try:
                pem = Path(public_key).read_bytes()
            except OSError as err:
                raise BadFileError(f"cannot read the {what}: {err}") from err
        key = load_public_key(pem, X25519PublicKey, what + " (create it with `adaloc site init`)")
        pem = _public_pem(key)  # canonical PEM: nothing but the key reaches sites.json
        sites = self._load()
        if any(s.site_id == site_id for s in sites):
            raise RegistryError(
                f"site {site_id!r} already exists; sites are never re-keyed, add a new site id"
            )
        entry = SiteEntry(site_id, key_fingerprint(pem), pem.decode(), _now())
        self._save([*sites, entry])
        return entry

    def revoke_site(self, site_id: str) -> SiteEntry:
        """Stop sealing key versions for ``site_id``; earlier versions stay as they are."""
        sites = self._load()
        for s in sites:
            if s.site_id == site_id:
                if not s.revoked:
                    s.revoked_at = _now()
                    self._save(sites)
                return s
        raise NotFoundError(f"site {site_id!r} is not in {self._sites_path}; see `keys site-ls`")

    def recipients(self) -> dict[str, bytes]:
        """Site id -> public PEM of every non-revoked site."""
        return {s.site_id: s.public_key.encode() for s in self.sites(include_revoked=False)}

    def seal_recipients(self) -> dict[str, bytes]:
        """What a key version is sealed for: every authorised site and the owner's recipient."""
        return {**self.recipients(), OWNER_RECIPIENT_ID: self.recipient_public_pem()}

    def seal(self, parts: dict[str, bytes], header: dict) -> bytes:
        """Seal ``parts`` for every authorised site and the owner; sign with the owner key."""
        if not self.recipients():
            raise NotAuthorizedError(
                "no authorised site to seal for; add one with `adaloc keys site-add`"
            )
        return seal(
            parts, header=header, recipients=self.seal_recipients(), signing_key=self.signing_key()
        )

    def idempotency_key(self, *chunks: bytes | str) -> str:
        """Deterministic id of a publication, keyed by the owner's secret.

        An HMAC (not a plain hash) so the id stored in MLflow tags cannot confirm a guessed
        key or token, yet a retry of the same publication finds the same run.
        """
        secret = self.signing_key().private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        mac = hmac.new(hashlib.sha256(b"adaloc/idempotency|" + secret).digest(), digestmod="sha256")
        for chunk in chunks:
            data = chunk.encode() if isinstance(chunk, str) else chunk
            mac.update(len(data).to_bytes(8, "big") + data)
        return mac.hexdigest()[:32]
