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
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from registry.errors import NotFoundError, RegistryError
from registry.fsutil import atomic_write_json, read_json
from registry.sealing import (
    OWNER_PRIVATE_FILE,
    OWNER_PUBLIC_FILE,
    generate_owner_keys,
    key_fingerprint,
    load_private_key,
    seal,
)

SITES_FILE = "sites.json"
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


class OwnerKeyring:
    """Folder holding owner.key (0600), owner.pub and sites.json."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @classmethod
    def init(cls, directory: str | Path, *, overwrite: bool = False) -> OwnerKeyring:
        """Create owner keys and an empty site list in ``directory``."""
        keyring = cls(directory)
        generate_owner_keys(keyring.directory, overwrite=overwrite)
        if overwrite or not keyring._sites_path.exists():
            keyring._save([])
        return keyring

    @property
    def _sites_path(self) -> Path:
        return self.directory / SITES_FILE

    @property
    def owner_public_pem(self) -> bytes:
        """The owner's Ed25519 public key (PEM) that sites verify signatures with."""
        path = self.directory / OWNER_PUBLIC_FILE
        try:
            return path.read_bytes()
        except FileNotFoundError as err:
            raise NotFoundError(
                f"owner public key {path} not found; run `adaloc keys owner-init {self.directory}`"
            ) from err

    def _load(self) -> list[SiteEntry]:
        data = read_json(self._sites_path)
        if data is None:
            raise NotFoundError(
                f"{self._sites_path} not found; run `adaloc keys owner-init {self.directory}`"
            )
        return [SiteEntry(**s) for s in data.get("sites", [])]

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
        pem = public_key if isinstance(public_key, bytes) else Path(public_key).read_bytes()
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as err:
            raise RegistryError(f"public key for site {site_id!r} is not a PEM key") from err
        if not isinstance(key, X25519PublicKey):
            raise RegistryError(
                f"public key for site {site_id!r} is {type(key).__name__}, expected X25519 "
                "(create it with `adaloc site init`)"
            )
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

    def seal(self, parts: dict[str, bytes], header: dict) -> bytes:
        """Seal ``parts`` for every authorised site and sign with the owner key."""
        signing_key = load_private_key(self.directory / OWNER_PRIVATE_FILE)
        return seal(parts, header=header, recipients=self.recipients(), signing_key=signing_key)

    def idempotency_key(self, *chunks: bytes | str) -> str:
        """Deterministic id of a publication, keyed by the owner's secret.

        An HMAC (not a plain hash) so the id stored in MLflow tags cannot confirm a guessed
        key or token, yet a retry of the same publication finds the same run.
        """
        private = load_private_key(self.directory / OWNER_PRIVATE_FILE)
        secret = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        mac = hmac.new(hashlib.sha256(b"adaloc/idempotency|" + secret).digest(), digestmod="sha256")
        for chunk in chunks:
            data = chunk.encode() if isinstance(chunk, str) else chunk
            mac.update(len(data).to_bytes(8, "big") + data)
        return mac.hexdigest()[:32]
