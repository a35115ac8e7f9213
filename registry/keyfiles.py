"""Owner and site key files: Ed25519/X25519 key pairs in PEM, written 0600 from the start.

The owner's signing key may be encrypted with a passphrase (``BestAvailableEncryption``);
flows and CLIs read it from ``ADALOC_OWNER_PASSPHRASE`` or from the file, pipe or
``/dev/fd/N`` named by ``ADALOC_OWNER_PASSPHRASE_FILE`` (never from a command-line argument,
which would show in ``ps``). Every reader raises BadFileError naming the file for empty,
garbage, truncated or wrong-kind keys, so a CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from registry.errors import BadFileError, NotFoundError
from registry.fsutil import PRIVATE_FILE_MODE, atomic_write_bytes

OWNER_PRIVATE_FILE, OWNER_PUBLIC_FILE = "owner.key", "owner.pub"
# The owner's own X25519 recipient pair: every key version is sealed for it too.
OWNER_RECIPIENT_FILE, OWNER_RECIPIENT_PUBLIC_FILE = "owner-recipient.key", "owner-recipient.pub"
SITE_PRIVATE_FILE, SITE_PUBLIC_FILE = "site.key", "site.pub"
PASSPHRASE_ENV, PASSPHRASE_FILE_ENV = "ADALOC_OWNER_PASSPHRASE", "ADALOC_OWNER_PASSPHRASE_FILE"
_KEY_KINDS = {
    Ed25519PrivateKey: "Ed25519",
    X25519PrivateKey: "X25519",
    Ed25519PublicKey: "Ed25519",
    X25519PublicKey: "X25519",
}


def is_encrypted(path: str | Path) -> bool:
    """True when the PEM private key at ``path`` is passphrase-encrypted."""
    try:
        return b"ENCRYPTED PRIVATE KEY" in Path(path).read_bytes()[:64]
    except OSError:
        return False


def load_public_key(pem: bytes, kind: type, what: str):
    """Parse a PEM public key of ``kind`` (Ed25519PublicKey, X25519PublicKey).

    BadFileError names ``what`` (e.g. the file) for empty, garbage or another kind of key.
    """
    if not isinstance(pem, bytes) or not pem.strip():
        raise BadFileError(f"{what} is empty; expected a PEM {_KEY_KINDS[kind]} public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise BadFileError(
            f"{what} is not a PEM public key; expected {_KEY_KINDS[kind]} ({_first_line(err)})"
        ) from err
    if not isinstance(key, kind):
        raise BadFileError(
            f"{what} holds a {_kind_name(key)} key, expected {_KEY_KINDS[kind]} (a public key)"
        )
    return key


def _kind_name(key) -> str:
    return next((n for t, n in _KEY_KINDS.items() if isinstance(key, t)), type(key).__name__)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:120]


def key_fingerprint(public_key_pem: bytes) -> str:
    """Short, stable id of a public key: first 16 hex digits of sha256 of its raw bytes."""
    try:
        key = serialization.load_pem_public_key(public_key_pem)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise BadFileError(
            f"not an Ed25519/X25519 PEM public key ({_first_line(err)}); check the .pub file"
        ) from err
    return hashlib.sha256(raw).hexdigest()[:16]


def _private_pem(key, passphrase: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _public_pem(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_keypair(
    directory: str | Path,
    names: tuple[str, str],
    key,
    overwrite: bool,
    passphrase: bytes | None = None,
) -> Path:
    directory = Path(directory)
    private_path = directory / names[0]
    if private_path.exists() and not overwrite:
        raise FileExistsError(
            f"{private_path} already exists; pass overwrite=True (--force) to replace it"
        )
    # Private key first with 0600: a world-readable private key must never exist, even briefly.
    pem = _private_pem(key, passphrase)
    atomic_write_bytes(private_path, pem, mode=PRIVATE_FILE_MODE)
    atomic_write_bytes(directory / names[1], _public_pem(key.public_key()))
    return private_path


def generate_owner_keys(
    directory: str | Path, *, overwrite: bool = False, passphrase: bytes | None = None
) -> Path:
    """Create the owner's Ed25519 signing pair (owner.key 0600, owner.pub) and X25519
    recipient pair (owner-recipient.key 0600, .pub); return owner.key.

    With ``passphrase`` both private keys are encrypted (``BestAvailableEncryption``: PKCS#8
    with scrypt + AES-256-CBC in current ``cryptography``).
    """
    path = _write_keypair(
        directory,
        (OWNER_PRIVATE_FILE, OWNER_PUBLIC_FILE),
        Ed25519PrivateKey.generate(),
        overwrite,
        passphrase,
    )
    generate_owner_recipient(directory, overwrite=overwrite, passphrase=passphrase)
    return path


def generate_owner_recipient(
    directory: str | Path, *, overwrite: bool = False, passphrase: bytes | None = None
) -> Path:
    """Create the owner's X25519 recipient pair (the owner's copy of every key version is
    wrapped for it); encrypted with ``passphrase`` like owner.key. Returns the private file."""
    return _write_keypair(
        directory,
        (OWNER_RECIPIENT_FILE, OWNER_RECIPIENT_PUBLIC_FILE),
        X25519PrivateKey.generate(),
        overwrite,
        passphrase,
    )


def generate_site_keys(directory: str | Path, *, overwrite: bool = False) -> Path:
    """Create a site's X25519 pair (site.key 0600, site.pub); return site.key."""
    return _write_keypair(
        directory, (SITE_PRIVATE_FILE, SITE_PUBLIC_FILE), X25519PrivateKey.generate(), overwrite
    )


def passphrase_from_env(environ: dict | None = None) -> bytes | None:
    """The owner key's passphrase from ``ADALOC_OWNER_PASSPHRASE`` or the file (or pipe,
    ``/dev/fd/N``) named by ``ADALOC_OWNER_PASSPHRASE_FILE``; None when neither is set."""
    env = os.environ if environ is None else environ
    if env.get(PASSPHRASE_ENV):
        return env[PASSPHRASE_ENV].encode()
    path = env.get(PASSPHRASE_FILE_ENV)
    if not path:
        return None
    return read_passphrase_file(path)


def read_passphrase_file(path: str | Path) -> bytes:
    """A passphrase from a file, pipe or ``/dev/fd/N`` (one trailing newline stripped)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadFileError(f"cannot read the owner passphrase file {str(path)!r}: {err}") from err
    data = data[:-1] if data.endswith(b"\n") else data
    data = data[:-1] if data.endswith(b"\r") else data
    if not data:
        raise BadFileError(f"owner passphrase file {str(path)!r} is empty")
    return data


def load_private_key(path: str | Path, kind: type | None = None, *, passphrase=None):
    """Load a PEM private key (``kind``: Ed25519PrivateKey or X25519PrivateKey, if given).

    NotFoundError when missing; BadFileError (naming the file) when empty, garbage, of
    another kind, or encrypted and ``passphrase`` is missing or wrong.
    """
    path = Path(path)
    try:
        pem = path.read_bytes()
    except FileNotFoundError as err:
        raise NotFoundError(f"private key {path} not found; create it with `init`") from err
    except (IsADirectoryError, PermissionError) as err:
        raise BadFileError(f"private key {path} is not readable: {err}") from err
    if not pem.strip():
        raise BadFileError(f"private key {path} is empty; restore it from your backup")
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase or None)
    except TypeError as err:  # encrypted without a password, or a password for a plain key
        if passphrase:
            key = _load_plain(pem, path)
        else:
            raise BadFileError(
                f"private key {path} is encrypted; set {PASSPHRASE_ENV} or "
                f"{PASSPHRASE_FILE_ENV} (a file or /dev/fd/N holding it)"
            ) from err
    except ValueError as err:
        if passphrase and b"ENCRYPTED" in pem:
            raise BadFileError(f"wrong passphrase for private key {path}") from err
        raise BadFileError(
            f"private key {path} is not a PEM private key ({_first_line(err)})"
        ) from err
    except UnsupportedAlgorithm as err:
        raise BadFileError(f"private key {path} uses an unsupported algorithm") from err
    if kind is not None and not isinstance(key, kind):
        raise BadFileError(
            f"private key {path} is a {_kind_name(key)} key; expected {_KEY_KINDS[kind]}"
        )
    return key


def _load_plain(pem: bytes, path: Path):
    # A passphrase is set in the environment but this key is not encrypted: still usable.
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise BadFileError(f"private key {path} is not a PEM private key") from err


def public_pem_of(private_key) -> bytes:
    """PEM of the public half of a private key."""
    return _public_pem(private_key.public_key())
