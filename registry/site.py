"""Deployment site: trusts only owner-signed records; installs one small key file per version.

A pull, under the site's exclusive lock: newest verified timestamp (root chain from the
site's owner.pub, expiry, counter >= the highest seen) -> the ref's key version from the
signed list -> its signed targets record -> the base once (length-capped, sha256-checked
before it is cached) -> the sealed key (capped, signed sha256, owner signature) -> decrypt
-> a new installed set (key, card, token, state) switched in by one atomic rename of the
``current`` symlink. The base is never rewritten or re-hashed per update; a full model file
is written only by :meth:`Site.export`. Layout: see ``registry.site_files``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import wait
from pathlib import Path

from adaloc.formats import (
    BASE_FILE,
    KEY_FILE,
    MODEL_CARD_FILE,
    TOKEN_FILE,
)
from registry import record_cache as RC
from registry import run_io
from registry import site_files as F
from registry import trust as T
from registry import trust_io as IO
from registry.errors import (
    BaseMismatchError,
    IntegrityError,
    LockedError,
    NotFoundError,
    RegistryError,
    RollbackError,
    TrustError,
)
from registry.fsutil import atomic_write_bytes, atomic_write_json
from registry.prefetch import KeyPrefetch
from registry.progress import Progress
from registry.records import PullResult, Verified
from registry.sealing import (
    OWNER_PUBLIC_FILE,
    SITE_PRIVATE_FILE,
    SITE_PUBLIC_FILE,
    generate_site_keys,
    key_fingerprint,
)
from registry.signed_open import open_against_targets
from registry.site_set import InstalledSet, SiteInstalled, _now  # noqa: F401 - re-exported
from registry.site_trust import SiteTrust
from registry.workers import worker

SITE_FORMAT_VERSION = 2
LOCK_TIMEOUT_S = 300.0
MODEL_FILE = "model.safetensors"


class Site(SiteTrust, SiteInstalled):
    """One deployment site rooted at ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._registry = None
        self._hint: tuple[str, ...] = ()  # trust runs the last pull found (record_cache)

    # -- init ------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | Path,
        *,
        site_id: str,
        tracking_uri: str,
        model_name: str,
        owner_public_pem: bytes,
        registry_uri: str | None = None,
        overwrite: bool = False,
    ) -> Site:
        """Create the site's key pair and config; give ``public_key_pem`` to the owner.

        Inputs are checked first (owner.pub must be the owner's Ed25519 key), so a refused
        init leaves nothing behind.
        """
        F.check_owner_pem(owner_public_pem, "owner public key")
        site = cls(directory)
        if (site.directory / F.SITE_FILE).exists() and not overwrite:
            raise RegistryError(f"{site.directory} is already a site; pass --force to re-create")
        existed = site.directory.exists()
        try:
            generate_site_keys(site.directory, overwrite=overwrite)
            atomic_write_bytes(site.directory / OWNER_PUBLIC_FILE, owner_public_pem)
            config = {
                "format_version": SITE_FORMAT_VERSION,
                "site_id": site_id,
                "tracking_uri": tracking_uri,
                "registry_uri": registry_uri,
                "model_name": model_name,
                "owner_fingerprint": key_fingerprint(owner_public_pem),
                "created_at": _now(),
            }
            atomic_write_json(site.directory / F.SITE_FILE, config)  # last: marks a site
        except BaseException:
            if not existed:
                shutil.rmtree(site.directory, ignore_errors=True)
            raise
        return site

    # -- local state -----------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """The site's configuration (site.json)."""
        cfg = F.read_model(self.directory / F.SITE_FILE, F.SiteConfig, "site config")
        if cfg is None:
            raise NotFoundError(f"{self.directory} is not a site; run `adaloc site init` first")
        return cfg.model_dump()

    @property
    def public_key_pem(self) -> bytes:
        """The site's X25519 public key, to hand to the owner (`adaloc keys site-add`)."""
        return (self.directory / SITE_PUBLIC_FILE).read_bytes()

    def set_tracking_uri(self, tracking_uri: str, registry_uri: str | None = None) -> None:
        """Point the site at another address of its registry (moved, proxy, mirror).

        Nothing else changes: what is pulled from there is verified exactly as before.
        """
        cfg = {**self.config, "tracking_uri": tracking_uri, "registry_uri": registry_uri}
        atomic_write_json(self.directory / F.SITE_FILE, cfg)
        self._registry = None

    def registry(self):
        """The KeyRegistry (transport only) this site pulls from (built once)."""
        if self._registry is None:
            from registry.store import KeyRegistry

            cfg = self.config
            uri = cfg["tracking_uri"]
            if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
                raise NotFoundError(
                    f"registry database {uri[len('sqlite:///') :]} does not exist; check the "
                    "site's tracking URI (`site.json`) or run the lock flow first"
                )
            self._registry = KeyRegistry(
                uri, cfg["model_name"], registry_uri=cfg.get("registry_uri")
            )
            hints = RC.load_hints(self.directory, uri, cfg["model_name"])
            self._hint = RC.seed(self._registry, hints)
        return self._registry

    # -- pull ------------------------------------------------------------------------------

    def pull(
        self,
        ref: int | str = "production",
        *,
        allow_rollback: bool = False,
        progress: Progress | None = None,
        lock_timeout: float = LOCK_TIMEOUT_S,
    ) -> PullResult:
        """Install key version ``ref`` (number, ``vN``, ``latest``, ``production``, alias).

        Any refusal or failure leaves the installed set byte-identical.
        """
        from filelock import FileLock, Timeout

        self.config  # noqa: B018 - a non-site folder fails here, before a lock file is made
        lock = FileLock(str(self.directory / F.LOCK_FILE))
        try:
            lock.acquire(timeout=lock_timeout)
        except Timeout as err:
            raise LockedError(
                f"another pull holds {self.directory / F.LOCK_FILE} for more than "
                f"{lock_timeout:.0f}s; wait for it to finish"
            ) from err
        try:
            # Leftovers of earlier pulls are removed while this one waits on the network;
            # done before its new set is staged, and its errors are raised as before.
            # The seen-counter write goes to the same thread, and all are done by the return.
            sweeping = worker("sweep").submit(F.sweep, self.directory)
            pending = [sweeping]
            try:
                result = self._pull_locked(ref, allow_rollback, progress, sweeping, pending)
            except BaseException:
                wait(pending)
                raise
            for done in pending:
                done.result()
            return result
        finally:
            lock.release()

    def _pull_locked(self, ref, allow_rollback: bool, progress, sweeping, pending) -> PullResult:
        # Local files first: a damaged site.key fails before anything is fetched or written.
        F.load_site_key(self.directory / SITE_PRIVATE_FILE)
        seconds, t0 = {}, time.perf_counter()
        keys_dir = self.directory / "cache" / "keys"
        # A head by name (latest / production / alias): its key copy is asked for in the same
        # round as the timestamp. Other versions: the key is prefetched while their targets
        # record is read. Either is used only when it matches the signed entry.
        # The timestamp is asked for first: on a shared link its small answer then comes
        # ahead of the key copy's bytes instead of queued behind them.
        first = self._timestamp_probe()
        head = self._head_prefetch(keys_dir, ref)
        prefetch = None
        try:
            ts, root = self._signed_state(allow_rollback, defer=pending.append, first=first)
            reg = self.registry()
            version = IO.resolve_ref(ts, root, ref)
            records = RC.RecordCache(self.directory / RC.RECORDS_DIR)
            entry = self._online(
                "read snapshot", lambda: IO.version_entry(reg, ts, version, cache=records)
            )
            if isinstance(entry, T.HeadEntry):
                prefetch = head
            elif entry is not None:
                prefetch = KeyPrefetch.start(reg, keys_dir, version, entry.run_id, self.installed())
            return self._pull_version(ref, allow_rollback, progress, ts, root, version,
                                      seconds, t0, prefetch, entry, records, sweeping)  # fmt: skip
        finally:
            for p in {id(x): x for x in (head, prefetch) if x}.values():
                p.close()

    def _head_prefetch(self, keys_dir: Path, ref) -> KeyPrefetch | None:
        if IO.head_key_path(ref) is None:
            return None
        try:
            reg = self.registry()  # (sets the hint: the trust run the last pull read)
            state = self.installed()
        except RegistryError:
            return None  # the same error is raised, in its order, by the pull itself
        return KeyPrefetch.start_head(reg, keys_dir, ref, (self._hint or (None,))[0], state)

    def _pull_version(
        self, ref, allow_rollback, progress, ts, root, version, seconds, t0, prefetch, entry,
        records, sweeping,
    ) -> PullResult:  # fmt: skip
        reg = self.registry()
        tg = self._online(
            "read targets",
            lambda: IO.read_targets(reg, ts, root, version, cache=records, entry=entry),
        )
        if str(ref).strip() == "production":
            promo = IO.production(ts, root)
            if not tg.gate.passed and not promo.gate_override:
                raise TrustError(f"production key version {version} failed the signed quality gate")
        seconds["resolve"] = time.perf_counter() - t0
        state = self.installed()
        previous = state["version"] if state else None
        if state and state["base_sha256"] != tg.base_sha256:
            raise BaseMismatchError(
                f"key version {version} is for base {tg.base_sha256[:12]}, but this site holds "
                f"base {state['base_sha256'][:12]}; a new lock needs a new site"
            )
        if state and version < state["version"] and not allow_rollback:
            raise RollbackError(
                f"key version {version} is older than installed version {state['version']}; "
                "pass --allow-rollback to install it anyway"
            )
        if state and state["version"] == version and state["targets_sha256"] == entry.sha256:
            try:
                self.installed_set(verify=True)
                return PullResult(
                    version,
                    previous,
                    False,
                    tg.base_sha256,
                    tg.model_sha256,
                    str(self.directory / F.CURRENT),
                    seconds=seconds,
                )
            except IntegrityError:
                pass  # the set was damaged on disk: re-install it below

        t = time.perf_counter()
        sweeping.result()  # (it removes staging folders: never one of this pull's)
        base_dir, bytes_base = self._ensure_base(tg, progress)
        seconds["base"] = time.perf_counter() - t

        t = time.perf_counter()
        k = tg.files["key.sealed"]
        keys_dir = self.directory / "cache" / "keys"
        blob = RC.RecordCache(keys_dir).get_file(f"v{version}.sealed", k.sha256, k.length)
        body_sha256 = None  # (hashed as it downloaded, when it comes from a prefetch)
        if blob is None and prefetch and (blob := prefetch.take(k)) is not None:
            prefetch.keep_as(keys_dir / f"v{version}.sealed")  # a cache, checked: signed sha256
            body_sha256 = prefetch.body_sha256
        if blob is None:  # not cached (or damaged there): download, capped and hash-checked
            part = keys_dir / f".v{version}.sealed.download"
            self._online(
                "download key",
                lambda: run_io.fetch_file(
                    reg, k.run_id, k.path, part, max_bytes=k.length, expect_sha256=k.sha256,
                    expect_length=k.length, label=f"key v{version}", progress=progress,
                    durable=False,  # a cache: re-hashed against the signed sha256 when read
                ),
            )  # fmt: skip
            blob = part.read_bytes()
            os.replace(part, keys_dir / f"v{version}.sealed")
        seconds["download_key"] = time.perf_counter() - t

        t = time.perf_counter()
        digests: dict[str, str] = {}
        staging = F.new_set_dir(self.directory, version)
        card_file = base_dir / MODEL_CARD_FILE
        staged = []  # the set's key (and token) written and fsynced on a second thread, from
        # the moment the parts are authenticated, while the key decodes and is checked: the
        # fsync of the key's bytes is most of an install's time and needs no GIL

        def stage(parts: dict[str, bytes]) -> None:
            secret = {KEY_FILE: parts["key"]}
            if "token" in parts:
                secret[TOKEN_FILE] = parts["token"]
            staged.append(worker("install").submit(F.write_set_files, staging, secret))

        try:
            try:
                key, parts = self._open(blob, tg, root, body_sha256, digests, on_parts=stage)
            finally:
                seconds["verify_decrypt"] = time.perf_counter() - t
                t = time.perf_counter()
            new_state = {
                "version": version,
                "parent": tg.parent,
                "mlflow_version": version,
                "base_sha256": tg.base_sha256,
                "model_sha256": tg.model_sha256,
                "key_sha256": digests["key"],
                "card_sha256": tg.files[MODEL_CARD_FILE].sha256,
                "token_sha256": digests.get("token"),
                "token": "token" in parts,
                "base_file_sha256": tg.files[BASE_FILE].sha256,
                "base_bytes": tg.files[BASE_FILE].length,
                "targets_sha256": entry.sha256,
                "timestamp_counter": ts.counter,
                "gate_passed": tg.gate.passed,
                "ref": str(ref),
                "installed_at": _now(),
                "previous": previous,
            }
            card = card_file.read_bytes()
            F.link_set_file(staging, MODEL_CARD_FILE, card_file)  # durable in the base cache
            state_json = (json.dumps(new_state, indent=2, sort_keys=True) + "\n").encode()
            F.write_set_files(staging, {F.STATE_FILE: state_json})
            for done in staged:
                done.result()  # (raises a failed write: the set is not switched to)
        except BaseException:
            wait(staged)  # then nothing of a refused key stays on disk
            shutil.rmtree(staging, ignore_errors=True)
            raise
        F.switch_current(self.directory, staging)
        seconds["install"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        return PullResult(
            version,
            previous,
            True,
            tg.base_sha256,
            tg.model_sha256,
            str(self.directory / F.CURRENT),
            bytes_base,
            len(blob),
            seconds,
            Verified(key, card, parts.get("token")),
        )

    def _open(
        self, blob, tg: T.TargetsSigned, root: T.RootSigned, body_sha256=None, digests=None,
        on_parts=None,
    ):  # fmt: skip
        """(Key, parts): the sealed blob's owner signature and header checked against the
        targets, then decrypted and decoded."""
        return open_against_targets(
            blob,
            tg,
            root,
            recipient_id=self.config["site_id"],
            private_key=F.load_site_key(self.directory / SITE_PRIVATE_FILE),
            body_sha256=body_sha256,
            digests=digests,
            on_parts=on_parts,
        )

    def _base_dir(self, base_sha256: str) -> Path:
        return self.directory / "cache" / "bases" / base_sha256

    def _ensure_base(self, tg: T.TargetsSigned, progress) -> tuple[Path, int]:
        """The verified base folder; downloaded once (capped, sha256 before caching)."""
        target = self._base_dir(tg.base_sha256)  # a signed, hex-only name: no path games
        b, c = tg.files[BASE_FILE], tg.files[MODEL_CARD_FILE]
        if target.exists():
            marker = F.read_model(target / "verified.json", F._Loose, "base marker", missing=None)
            ok = (
                marker is not None
                and marker.model_dump().get("base") == b.sha256
                and (marker.model_dump().get("card") == c.sha256)
                and (target / BASE_FILE).is_file()
                and (target / BASE_FILE).stat().st_size == b.length
            )
            if ok:
                return target, 0
            F.quarantine(self.directory, target, "cached base does not match the signed targets")
        reg = self.registry()
        staging = target.with_name(f".{tg.base_sha256}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, e in ((MODEL_CARD_FILE, c), (BASE_FILE, b)):
            self._online(
                f"download {name}",
                lambda e=e, name=name: run_io.fetch_file(
                    reg, e.run_id, e.path, staging / name, max_bytes=e.length,
                    expect_sha256=e.sha256, expect_length=e.length,
                    label="base" if name == BASE_FILE else name, progress=progress,
                ),
            )  # fmt: skip
        atomic_write_json(
            staging / "verified.json",
            {"base": b.sha256, "card": c.sha256, "base_sha256": tg.base_sha256},
        )
        os.replace(staging, target)  # the cache entry appears complete or not at all
        return target, b.length

    def load_model(self, *, device: str | None = None, verify: bool = True):
        """The installed key version as a ready module (see registry.loader.load_model)."""
        from registry.loader import load_model

        return load_model(self, device=device, verify=verify)

    # -- export / status -------------------------------------------------------------------
