"""A site's folder: layout, typed readers of every local file, and the atomic installed set.

Layout::

    site.json  owner.pub  site.key (0600)  site.pub
    seen.json                 rollback guard: highest timestamp counter seen (beside site.key)
    site.lock                 exclusive lock held by a pull
    trust/root.json           newest root record this site accepted
    cache/bases/<sha256>/     base.safetensors, model.json, verified.json (checked once)
    cache/keys/v<N>.sealed    sealed key versions as downloaded (signed sha256)
    cache/records/<sha256>    verified targets records by signed sha256 (registry.record_cache)
    cache/registry.json       lookup hints for the next pull (experiment, trust run)
    cache/quarantine/         cache entries that failed a check (kept for inspection)
    cache/available.json      last signed version list (for `status --offline`)
    installs/v<N>-<id>/       key.safetensors (0600), model.json, token.json (0600), state.json
    current -> installs/...   the installed set; switched by one atomic rename of a symlink
    model/model.safetensors   only written by `adaloc site export` (0600 in a 0700 folder)

Every reader raises SiteFileError (one line naming the file) for an empty, garbage or
wrong-shape file, or a key of the wrong kind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import NotFoundError, SiteFileError
from registry.fsutil import atomic_write_json

SITE_FILE, SEEN_FILE, LOCK_FILE = "site.json", "seen.json", "site.lock"
STATE_FILE, CURRENT, INSTALLS = "state.json", "current", "installs"
TRUSTED_ROOT = "trust/root.json"
KEEP_INSTALLS = 3  # the current set and two before it (a server may still be reading one)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class SiteConfig(_Loose):
    """site.json."""

    site_id: str = Field(min_length=1)
    tracking_uri: str = Field(min_length=1)
    model_name: str = Field(min_length=1)
    registry_uri: str | None = None
    owner_fingerprint: str | None = None


class InstallState(_Loose):
    """installs/<set>/state.json: what the set holds and the signed hashes it was checked by."""

    version: int = Field(ge=1)
    parent: int | None = None
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_sha256: str
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    card_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    token_sha256: str | None = None
    base_file_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    base_bytes: int = Field(ge=0)
    targets_sha256: str
    timestamp_counter: int = Field(ge=0)


class Seen(_Loose):
    """seen.json: the rollback guard."""

    counter: int = Field(ge=0)


class Available(_Loose):
    """cache/available.json."""

    fetched_at: str | None = None
    versions: list[dict]  # required: an object without it is not a version list


def read_model(path: Path, model: type[BaseModel], what: str, *, missing=None):
    """Parse ``path`` as JSON into ``model``; SiteFileError (one line) when it is bad."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return missing
    except OSError as err:
        raise SiteFileError(f"{what} {path} cannot be read ({err.strerror})") from err
    if not raw.strip():
        raise SiteFileError(f"{what} {path} is empty; restore it or re-create the site")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SiteFileError(f"{what} {path} is not JSON ({err}); restore it") from err
    if not isinstance(data, dict):
        raise SiteFileError(f"{what} {path} holds a {type(data).__name__}, expected an object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise SiteFileError(f"{what} {path}: field {loc!r} {first['msg'].lower()}") from err


def load_site_key(path: Path) -> X25519PrivateKey:
    """site.key: the site's X25519 private key."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise NotFoundError(f"site key {path} not found; run `adaloc site init`") from err
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SiteFileError(f"site key {path} is not a PEM private key; restore it") from err
    if not isinstance(key, X25519PrivateKey):
        raise SiteFileError(f"site key {path} is {type(key).__name__}, expected X25519")
    return key


def check_owner_pem(pem: bytes, what: str) -> bytes:
    """``pem`` if it is an Ed25519 public key (the owner's signing key), else SiteFileError."""
    if not pem.strip():
        raise SiteFileError(f"{what} is empty; copy the owner's owner.pub")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SiteFileError(f"{what} is not a PEM public key; copy the owner's owner.pub") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SiteFileError(
            f"{what} is a {type(key).__name__}, expected the owner's Ed25519 signing key "
            "(owner.pub, not a site.pub)"
        )
    return pem


def load_owner_pem(path: Path) -> bytes:
    """owner.pub: the owner's Ed25519 public key (the site's trust anchor)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise NotFoundError(f"owner key {path} not found; re-create the site") from err
    return check_owner_pem(raw, f"owner key {path}")


def current_dir(site_dir: Path) -> Path | None:
    """The installed set's folder (the ``current`` symlink resolved once), or None."""
    link = site_dir / CURRENT
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SiteFileError(
            f"{link} is not a symlink to an installed set ({err.strerror})"
        ) from err
    path = (site_dir / target).resolve()
    if path.parent != (site_dir / INSTALLS).resolve():
        raise SiteFileError(f"{link} points outside {site_dir / INSTALLS}: {target}")
    return path


def new_set_dir(site_dir: Path, version: int) -> Path:
    """A fresh staging folder (0700) for installing ``version``; renamed when complete."""
    root = site_dir / INSTALLS
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".v{version}-{secrets.token_hex(4)}.partial"
    staging.mkdir(mode=0o700)
    return staging


def link_set_file(staging: Path, name: str, source: Path) -> None:
    """A set's copy of a file the site already holds durably (the base's model card): a hard
    link, no bytes written or fsynced; a copy where links are not possible."""
    try:
        os.link(source, staging / name)
    except OSError:
        write_set_files(staging, {name: source.read_bytes()})


def write_set_files(staging: Path, files: dict[str, bytes], *, mode: int = 0o600) -> None:
    """The files of a set being staged: all written, then fsynced concurrently (fsync drops
    the GIL, and the file system commits them together) instead of one after another."""
    from concurrent.futures import ThreadPoolExecutor

    fds = []
    try:
        for name, data in files.items():
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            fds.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        with ThreadPoolExecutor(max_workers=len(fds) or 1) as pool:
            list(pool.map(os.fsync, fds))
    finally:
        for fd in fds:
            os.close(fd)


def switch_current(site_dir: Path, staging: Path) -> Path:
    """Publish ``staging`` as the installed set: rename it, then atomically swap ``current``."""
    from adaloc.fsutil import _fsync_dir

    _fsync_dir(staging)  # its entries (written by write_set_files) before it is renamed
    final = staging.with_name(staging.name[1:].removesuffix(".partial"))
    os.replace(staging, final)
    _fsync_dir(final.parent)
    tmp = site_dir / f".current.{secrets.token_hex(4)}"
    os.symlink(f"{INSTALLS}/{final.name}", tmp)
    os.replace(tmp, site_dir / CURRENT)  # rename(2) of a symlink: readers see old or new set
    _fsync_dir(site_dir)
    return final


def sweep(site_dir: Path) -> None:
    """Remove what a killed pull left behind and all but the newest KEEP_INSTALLS sets."""
    for leftover in site_dir.glob(".current.*"):
        leftover.unlink(missing_ok=True)
    for root in (site_dir / INSTALLS, site_dir / "cache" / "bases"):
        for partial in root.glob(".*.partial") if root.is_dir() else ():
            shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(site_dir / "cache" / "tmp", ignore_errors=True)
    current = current_dir(site_dir)
    sets = (
        sorted(
            (p for p in (site_dir / INSTALLS).glob("v*") if p.is_dir()),
            key=lambda p: p.stat().st_mtime,
        )
        if (site_dir / INSTALLS).is_dir()
        else []
    )
    for old in sets[:-KEEP_INSTALLS]:
        if current is None or old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)


def quarantine(site_dir: Path, path: Path, reason: str) -> Path:
    """Move a bad cache entry aside (never delete evidence); returns where it went."""
    qdir = site_dir / "cache" / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    dest = qdir / f"{path.name}.{secrets.token_hex(4)}"
    os.replace(path, dest)
    atomic_write_json(dest.with_name(dest.name + ".reason.json"), {"reason": reason})
    return dest
