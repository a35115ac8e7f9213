"""Deployment site: holds the base, pulls sealed key versions, installs the authorized model.

Folder layout::

    site.json  owner.pub  site.key (0600)  site.pub
    cache/bases/<base sha256>/{base.safetensors, model.json, sha256.json}
    cache/keys/v<N>.sealed   cache/available.json
    model/model.safetensors  model/model.json  model/token.json (0600, when sealed with one)
    state.json               what is installed (written after the model, both atomically)

Nothing under model/ or state.json changes until every check of a pull has passed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from adaloc.errors import KeyFormatError, KeyMismatchError
from adaloc.formats import BASE_FILE, MODEL_CARD_FILE, TOKEN_FILE, sha256_bytes, sha256_file
from registry.errors import (
    BaseMismatchError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    RollbackError,
    UnavailableError,
)
from registry.fsutil import atomic_write_bytes, atomic_write_json, read_json
from registry.progress import Progress, watch_downloads
from registry.records import PullResult
from registry.sealing import (
    OWNER_PUBLIC_FILE,
    SITE_PRIVATE_FILE,
    SITE_PUBLIC_FILE,
    generate_site_keys,
    key_fingerprint,
    load_private_key,
    open_sealed,
)

SITE_FILE, STATE_FILE, MODEL_FILE = "site.json", "state.json", "model.safetensors"
SITE_FORMAT_VERSION = 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Site:
    """One deployment site rooted at ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._bases: dict[str, dict] = {}  # base sha256 -> verified state (long-lived sites)
        self._registry = None

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
        """Create the site's key pair and config; give ``public_key_pem`` to the owner."""
        site = cls(directory)
        if (site.directory / SITE_FILE).exists() and not overwrite:
            raise RegistryError(f"{site.directory} is already a site; pass --force to re-create")
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
        atomic_write_json(site.directory / SITE_FILE, config)
        return site

    # -- local state -----------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """The site's configuration (site.json)."""
        data = read_json(self.directory / SITE_FILE)
        if data is None:
            raise NotFoundError(f"{self.directory} is not a site; run `adaloc site init` first")
        return data

    @property
    def public_key_pem(self) -> bytes:
        """The site's X25519 public key, to hand to the owner (`adaloc keys site-add`)."""
        return (self.directory / SITE_PUBLIC_FILE).read_bytes()

    @property
    def model_path(self) -> Path:
        """Where the authorized model is installed."""
        return self.directory / "model" / MODEL_FILE

    def installed(self) -> dict | None:
        """The installed state (version, hashes, time), or None before the first pull."""
        return read_json(self.directory / STATE_FILE)

    def set_tracking_uri(self, tracking_uri: str, registry_uri: str | None = None) -> None:
        """Point the site at another address of its registry (server moved, proxy, mirror).

        The owner's public key and the installed state stay: what is pulled from the new
        address is verified exactly as before.
        """
        cfg = {**self.config, "tracking_uri": tracking_uri, "registry_uri": registry_uri}
        atomic_write_json(self.directory / SITE_FILE, cfg)
        self._registry = None

    def registry(self):
        """The KeyRegistry this site pulls from (built once)."""
        if self._registry is None:
            from registry.store import KeyRegistry

            cfg = self.config
            self._registry = KeyRegistry(
                cfg["tracking_uri"], cfg["model_name"], registry_uri=cfg.get("registry_uri")
            )
        return self._registry

    def _online(self, what: str, call: Callable):
        try:
            return call()
        except RegistryError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow/requests/boto raise many types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UnavailableError(
                f"{what}: registry at {self.config['tracking_uri']} unavailable ({first[:200]})"
            ) from err

    # -- pull ------------------------------------------------------------------------------

    def pull(
        self,
        ref: int | str = "production",
        *,
        allow_rollback: bool = False,
        progress: Progress | None = None,
    ) -> PullResult:
        """Install key version ``ref``; on any failure the previous model stays installed."""
        cfg, seconds, t0 = self.config, {}, time.perf_counter()
        reg = self.registry()
        kv = self._online("resolve", lambda: reg.resolve(ref, with_metrics=False))
        seconds["resolve"] = time.perf_counter() - t0
        state = self.installed()
        previous = state["version"] if state else None
        if state and state["base_sha256"] != kv.base_sha256:
            raise BaseMismatchError(
                f"key version {kv.version} is for base {kv.base_sha256[:12]}, but this site "
                f"holds base {state['base_sha256'][:12]}; a new lock needs a new site"
            )
        if state and kv.version < state["version"] and not allow_rollback:
            raise RollbackError(
                f"key version {kv.version} is older than installed version {state['version']}; "
                "pass --allow-rollback to install it anyway"
            )
        if state and state["artifact_sha256"] == kv.artifact_sha256 and self._model_intact(state):
            return PullResult(
                kv.version,
                previous,
                False,
                kv.base_sha256,
                state["model_sha256"],
                str(self.model_path),
                seconds=seconds,
            )

        t = time.perf_counter()
        base_dir, bytes_base = self._ensure_base(kv.base_sha256, progress)
        seconds["base"] = time.perf_counter() - t

        t = time.perf_counter()
        tmp = self.directory / "cache" / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with watch_downloads(tmp, f"key v{kv.version}", kv.sealed_bytes, progress):
            sealed_path = self._online("download key", lambda: reg.download_key(kv, tmp))
        blob = sealed_path.read_bytes()
        atomic_write_bytes(self.directory / "cache" / "keys" / f"v{kv.version}.sealed", blob)
        shutil.rmtree(tmp, ignore_errors=True)
        seconds["download_key"] = time.perf_counter() - t

        t = time.perf_counter()
        header, parts = open_sealed(
            blob,
            site_id=cfg["site_id"],
            site_private_key=load_private_key(self.directory / SITE_PRIVATE_FILE),
            owner_public_pem=(self.directory / OWNER_PUBLIC_FILE).read_bytes(),
        )
        self._check_header(header, kv, state, allow_rollback)
        seconds["verify_decrypt"] = time.perf_counter() - t

        t = time.perf_counter()
        model_bytes, model_sha, file_sha = self._apply(base_dir, header, parts["key"])
        seconds["apply"] = time.perf_counter() - t

        t = time.perf_counter()
        self._install(model_bytes, base_dir, parts.get("token"))
        new_state = {
            "version": header.key_version,
            "parent": header.parent,
            "mlflow_version": kv.mlflow_version,
            "base_sha256": header.base_sha256,
            "model_sha256": model_sha,
            "model_file_sha256": file_sha,
            "artifact_sha256": kv.artifact_sha256,
            "token": "token" in parts,
            "ref": str(ref),
            "installed_at": _now(),
            "previous": previous,
        }
        atomic_write_json(self.directory / STATE_FILE, new_state)
        seconds["install"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        return PullResult(
            header.key_version,
            previous,
            True,
            header.base_sha256,
            model_sha,
            str(self.model_path),
            bytes_base,
            len(blob),
            seconds,
        )

    def _check_header(self, header, kv, state: dict | None, allow_rollback: bool) -> None:
        """The signed header, not the editable MLflow tags, is what counts."""
        if header.extra.get("model") not in (None, self.config["model_name"]):
            raise BaseMismatchError(
                f"sealed key is for model {header.extra.get('model')!r}, "
                f"this site serves {self.config['model_name']!r}"
            )
        if header.key_version != kv.version:
            raise IntegrityError(
                f"registry says key version {kv.version} but the signed header says "
                f"{header.key_version}: tags were altered"
            )
        if header.base_sha256 != kv.base_sha256:
            raise BaseMismatchError(
                f"key version {kv.version} is signed for base {header.base_sha256[:12]}, "
                f"not the base {kv.base_sha256[:12]} the registry pairs it with"
            )
        if state and header.key_version < state["version"] and not allow_rollback:
            raise RollbackError(
                f"key version {header.key_version} is older than installed version "
                f"{state['version']}; pass --allow-rollback to install it anyway"
            )

    def _ensure_base(self, base_sha256: str, progress: Progress | None) -> tuple[Path, int]:
        """Cached base folder for ``base_sha256`` (downloaded once, sha256-checked)."""
        target = self.directory / "cache" / "bases" / base_sha256
        meta = read_json(target / "sha256.json")
        if meta and (target / BASE_FILE).is_file():
            return target, 0
        reg = self.registry()
        bv = self._online("find base", lambda: reg.base(base_sha256))
        staging = target.with_name(f".{base_sha256}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with watch_downloads(staging, "base", bv.bytes, progress):
            got = self._online("download base", lambda: reg.download_base(bv, staging))
        got = Path(got)
        if sha256_file(got / BASE_FILE) != bv.file_sha256:
            shutil.rmtree(staging, ignore_errors=True)
            raise IntegrityError(
                f"downloaded {BASE_FILE} does not match published sha256 {bv.file_sha256[:12]}"
            )
        atomic_write_json(got / "sha256.json", bv.to_dict())
        shutil.rmtree(target, ignore_errors=True)
        got.rename(target)  # the cache entry appears complete or not at all
        shutil.rmtree(staging, ignore_errors=True)
        return target, (target / BASE_FILE).stat().st_size

    def _apply(self, base_dir: Path, header, key_bytes: bytes) -> tuple[bytes, str, str]:
        """Decode the key, unlock the base, check the result.

        Returns (file bytes, state sha256, file sha256). When the owner signed the authorized
        model's sha256 (every version the registry publishes), that one check covers the
        cached base too, so the base is not re-hashed on each pull.
        """
        from safetensors.torch import save as st_save

        from adaloc.artifact import decode_key
        from adaloc.lock import apply_key, state_sha256

        try:
            key = decode_key(key_bytes)
        except KeyFormatError as err:
            raise IntegrityError(f"key version {header.key_version}: {err}") from err
        if key.version != header.key_version or key.base_sha256 != header.base_sha256:
            raise IntegrityError(
                f"key artifact says version {key.version} / base {key.base_sha256[:12]}, the "
                f"signed header says {header.key_version} / {header.base_sha256[:12]}"
            )
        signed = bool(header.model_sha256)
        state = self._base_state(base_dir, header.base_sha256, verify=not signed)
        try:
            state = apply_key(state, key, check_base=False)
        except KeyMismatchError as err:
            raise BaseMismatchError(str(err)) from err
        meta = {
            "format": "adaloc-model",
            "key_version": str(header.key_version),
            "base_sha256": header.base_sha256,
        }
        with ThreadPoolExecutor(1) as pool:  # hashlib releases the GIL: hash while serialising
            model_sha_job = pool.submit(state_sha256, state)
            data = st_save(state, metadata=meta)
            file_sha = sha256_bytes(data)
            model_sha = model_sha_job.result()
        if signed and model_sha != header.model_sha256:
            self._bases.pop(header.base_sha256, None)
            self._base_state(base_dir, header.base_sha256, verify=True)  # names a bad cache
            raise IntegrityError(
                f"authorized model of key version {header.key_version} has sha256 "
                f"{model_sha[:12]}, the owner's is {header.model_sha256[:12]}"
            )
        return data, model_sha, file_sha

    def _base_state(self, base_dir: Path, base_sha256: str, *, verify: bool = True) -> dict:
        """The cached base's state dict, kept per Site object (fingerprint-checked if asked)."""
        cached = self._bases.get(base_sha256)
        if cached is None or (verify and not cached["verified"]):
            from adaloc.artifact import decode_base

            path = base_dir / BASE_FILE
            try:
                state, embedded = decode_base(path.read_bytes(), verify=verify)
            except (KeyFormatError, OSError) as err:
                raise IntegrityError(f"cached base is unusable ({err}); delete {base_dir}") from err
            if embedded != base_sha256:
                raise BaseMismatchError(
                    f"cached base is {str(embedded)[:12]}, the key needs {base_sha256[:12]}"
                )
            cached = self._bases[base_sha256] = {"state": state, "verified": verify}
        return cached["state"]

    def _install(self, model_bytes: bytes, base_dir: Path, token: bytes | None) -> None:
        model_dir = self.model_path.parent
        atomic_write_bytes(model_dir / MODEL_CARD_FILE, (base_dir / MODEL_CARD_FILE).read_bytes())
        if token is not None:
            atomic_write_bytes(model_dir / TOKEN_FILE, token, mode=0o600)
        atomic_write_bytes(self.model_path, model_bytes)
        if token is None:
            (model_dir / TOKEN_FILE).unlink(missing_ok=True)

    def _model_intact(self, state: dict) -> bool:
        return self.model_path.is_file() and sha256_file(self.model_path) == state.get(
            "model_file_sha256"
        )

    # -- status ----------------------------------------------------------------------------

    def status(self, *, online: bool = True) -> dict:
        """Installed version and what the registry offers (from cache when offline)."""
        cfg, state = self.config, self.installed()
        cache = self.directory / "cache" / "available.json"
        available, offline, error = None, not online, None
        if online:
            try:
                versions = self._online("list", lambda: self.registry().history())
                available = {
                    "fetched_at": _now(),
                    "versions": [
                        {
                            "version": kv.version,
                            "parent": kv.parent,
                            "aliases": kv.aliases,
                            "sealed_bytes": kv.sealed_bytes,
                            "base_sha256": kv.base_sha256,
                            "for_this_site": cfg["site_id"] in kv.recipients,
                        }
                        for kv in versions
                    ],
                }
                atomic_write_json(cache, available)
            except UnavailableError as err:
                offline, error = True, str(err)
        if available is None:
            available = read_json(cache) or {"fetched_at": None, "versions": []}
        latest = max((v["version"] for v in available["versions"]), default=None)
        return {
            "site_id": cfg["site_id"],
            "model_name": cfg["model_name"],
            "tracking_uri": cfg["tracking_uri"],
            "installed": state,
            "model_intact": bool(state) and self._model_intact(state),
            "available": available["versions"],
            "available_fetched_at": available["fetched_at"],
            "update_available": latest is not None and (not state or latest > state["version"]),
            "offline": offline,
            "error": error,
        }
