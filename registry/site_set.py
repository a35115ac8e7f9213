"""The installed set of a site: reading it (verified), exporting a full model, status.

A mixin of :class:`registry.site.Site`; see ``registry.site_files`` for the layout.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from adaloc.formats import (
    BASE_FILE,
    KEY_FILE,
    MODEL_CARD_FILE,
    TOKEN_FILE,
    sha256_bytes,
    sha256_file,
)
from registry import site_files as F
from registry import trust as T
from registry import trust_io as IO
from registry.errors import (
    IntegrityError,
    NotFoundError,
    RollbackError,
    SiteFileError,
    TrustError,
    UnavailableError,
)
from registry.fsutil import atomic_write_bytes, atomic_write_json

MODEL_FILE = "model.safetensors"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class InstalledSet:
    """What a site has installed: every path resolved from one read of ``current``."""

    version: int
    directory: Path
    base_path: Path
    card_path: Path
    key_path: Path
    token_path: Path | None
    base_sha256: str
    model_sha256: str  # the owner-signed sha256 of base + this key
    state: dict

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


class SiteInstalled:
    """Mixin: what is installed, the full-model export and the status report."""

    @property
    def model_path(self) -> Path:
        """Where :meth:`export` writes the full authorized model."""
        return self.directory / "model" / MODEL_FILE

    def installed(self) -> dict | None:
        """The installed set's state (version, signed hashes, time), or None before a pull."""
        current = F.current_dir(self.directory)
        if current is None:
            return None
        state = F.read_model(current / F.STATE_FILE, F.InstallState, "installed state")
        if state is None:
            raise SiteFileError(f"installed set {current} has no {F.STATE_FILE}; pull again")
        return state.model_dump()

    def installed_set(
        self, *, verify: bool = True, verify_base: bool = False
    ) -> InstalledSet | None:
        """The installed set (base + key + card + token + signed model sha256), or None.

        ``verify`` re-checks the small files against the hashes recorded at install (key,
        token) and signed by the owner (card), and the base's length; ``verify_base`` also
        re-hashes the base against its signed sha256 (slow for big models).
        """
        current = F.current_dir(self.directory)
        if current is None:
            return None
        state = F.read_model(current / F.STATE_FILE, F.InstallState, "installed state")
        if state is None:
            raise SiteFileError(f"installed set {current} has no {F.STATE_FILE}; pull again")
        base = self._base_dir(state.base_sha256) / BASE_FILE
        token = current / TOKEN_FILE if state.token_sha256 else None
        s = InstalledSet(
            state.version,
            current,
            base,
            current / MODEL_CARD_FILE,
            current / KEY_FILE,
            token,
            state.base_sha256,
            state.model_sha256,
            state.model_dump(),
        )
        if verify:
            checks = [(s.key_path, state.key_sha256), (s.card_path, state.card_sha256)]
            checks += [(token, state.token_sha256)] if token else []
            for path, sha in checks:
                if not path.is_file() or sha256_file(path) != sha:
                    raise IntegrityError(
                        f"installed {path.name} of key version {s.version} "
                        "changed on disk; pull again (or --allow-rollback)"
                    )
            if not base.is_file() or base.stat().st_size != state.base_bytes:
                raise IntegrityError(f"cached base {base} is missing or resized; pull again")
            if verify_base and sha256_file(base) != state.base_file_sha256:
                raise IntegrityError(f"cached base {base} differs from its signed sha256")
        return s

    def export(self, path: str | Path | None = None) -> dict:
        """Write the full authorized model (base + key) to ``path`` (default model/...).

        The result's state sha256 is checked against the owner-signed model sha256 first;
        the file is 0600 in a 0700 folder. Returns path, version and both hashes.
        """
        from safetensors.torch import load_file
        from safetensors.torch import save as st_save

        from adaloc.artifact import decode_base, decode_key
        from adaloc.lock import apply_key, state_sha256

        s = self.installed_set(verify=True)
        if s is None:
            raise NotFoundError(f"nothing is installed in {self.directory}; run `adaloc site pull`")
        state, _ = decode_base(s.base_path.read_bytes(), verify=False)
        model = apply_key(state, decode_key(s.key_path.read_bytes()), check_base=False)
        model_sha = state_sha256(model)
        if s.model_sha256 and model_sha != s.model_sha256:
            raise IntegrityError(
                f"base + key v{s.version} gives sha256 {model_sha[:12]}, the owner "
                f"signed {s.model_sha256[:12]}; pull again"
            )
        meta = {
            "format": "adaloc-model",
            "key_version": str(s.version),
            "base_sha256": s.base_sha256,
        }
        data = st_save(model, metadata=meta)
        out = Path(path) if path else self.model_path
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(out.parent, 0o700)
        atomic_write_bytes(out, data, mode=0o600)
        del load_file
        return {
            "path": str(out),
            "version": s.version,
            "model_sha256": model_sha,
            "file_sha256": sha256_bytes(data),
            "owner_model_sha256": s.model_sha256,
        }

    def status(self, *, online: bool = True) -> dict:
        """Installed version and the owner-signed versions on offer (cached when offline)."""
        cfg, state = self.config, self.installed()
        cache = self.directory / "cache" / "available.json"
        available, offline, error = None, not online, None
        if online:
            try:
                ts, root = self._signed_state(allow_rollback=False, persist=False)
                aliases = {**{a: v for a, v in ts.aliases.items()}}
                if ts.promotion is not None:
                    aliases["production"] = IO.production(ts, root).key_version
                available = {
                    "fetched_at": _now(),
                    "timestamp_counter": ts.counter,
                    "expires": T.iso(ts.expires),
                    "versions": [
                        {
                            "version": int(v),
                            "aliases": sorted(a for a, n in aliases.items() if n == int(v)),
                        }
                        for v in sorted(
                            IO.all_entries(self.registry(), ts) if ts.snapshot else {},
                            key=int,
                        )
                    ],
                }
                atomic_write_json(cache, available)
            except (UnavailableError, TrustError, RollbackError, NotFoundError) as err:
                offline, error = True, str(err)
        if available is None:
            got = F.read_model(cache, F.Available, "cached version list")
            available = got.model_dump() if got else {"fetched_at": None, "versions": []}
        latest = max((v["version"] for v in available["versions"]), default=None)
        try:
            intact = bool(state) and self.installed_set(verify=True) is not None
        except IntegrityError:
            intact = False
        return {
            "site_id": cfg["site_id"],
            "model_name": cfg["model_name"],
            "tracking_uri": cfg["tracking_uri"],
            "installed": state,
            "model_intact": intact,
            "available": available["versions"],
            "available_fetched_at": available["fetched_at"],
            "update_available": latest is not None and (not state or latest > state["version"]),
            "offline": offline,
            "error": error,
        }
