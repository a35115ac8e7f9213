"""A site's caches of what it already read: verified records by sha256, and where things are.

Both are only caches: deleting either changes nothing but the number of round trips.
- ``cache/records/<sha256>``: signed records (targets) exactly as verified, named by the
  sha256 the owner-signed timestamp pins them by. A hit is re-hashed (and the caller
  re-verifies its signatures) before use; a damaged entry is dropped and fetched again.
- ``cache/registry.json``: hints for the next pull (the experiment's id and artifact
  location, the trust runs and their artifact roots), so it needs no lookup to start. They
  are transport hints: nothing read through them is trusted without its signatures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from adaloc.formats import sha256_bytes

RECORDS_DIR, HINTS_FILE = "cache/records", "cache/registry.json"
_SHA = re.compile(r"^[0-9a-f]{64}$")


class RecordCache:
    """Content-addressed record bytes under ``directory`` (0600 files)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, sha256: str) -> Path | None:
        return self.directory / sha256 if _SHA.match(sha256) else None

    def get(self, sha256: str, length: int) -> bytes | None:
        """The cached bytes when they still have this length and sha256; else None."""
        return self._read(self._path(sha256), sha256, length)

    def get_file(self, name: str, sha256: str, length: int) -> bytes | None:
        """Bytes of the file ``name`` here (a site's sealed key cache) when they still have
        the signed length and sha256; else None (a damaged file is removed)."""
        return self._read(self.directory / Path(name).name, sha256, length)

    @staticmethod
    def _read(path: Path | None, sha256: str, length: int) -> bytes | None:
        try:
            data = path.read_bytes() if path else None
        except OSError:
            return None
        if data is None or len(data) != length or sha256_bytes(data) != sha256:
            if data is not None:
                path.unlink(missing_ok=True)  # damaged: fetched (and re-verified) again
            return None
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Keep ``data`` (already verified by the caller) under its sha256."""
        path = self._path(sha256)
        if path is not None and sha256_bytes(data) == sha256 and not path.is_file():
            _write(path, data)


def load_hints(site_dir: Path, tracking_uri: str, model_name: str) -> dict:
    """Hints of the last pull from the same registry address and model; {} when none fit."""
    try:
        hints = json.loads((Path(site_dir) / HINTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    ok = (
        isinstance(hints, dict)
        and hints.get("tracking_uri") == tracking_uri
        and hints.get("model_name") == model_name
        and isinstance(hints.get("experiment"), list)
        and len(hints["experiment"]) == 2
        and all(isinstance(x, str) for x in hints["experiment"])
        and isinstance(hints.get("trust_runs"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in hints["trust_runs"].items())
    )
    return hints if ok else {}


def seed(store, hints: dict) -> tuple[str, ...]:
    """Put ``hints`` into a fresh registry object; returns the hinted trust run ids."""
    from registry import run_io

    if not hints:
        return ()
    store.__dict__.setdefault("_read_experiment", tuple(hints["experiment"]))
    for run_id, uri in hints["trust_runs"].items():
        run_io.remember(store, run_id, uri)
    return tuple(hints["trust_runs"])


def save_hints(site_dir: Path, store, trust_run_id: str) -> None:
    """Remember where this pull found things (written only when they changed)."""
    from registry import run_io

    exp = store.__dict__.get("_read_experiment")
    uri = run_io._uris(store).get(trust_run_id)
    if exp is None or uri is None:
        return
    hints = {
        "tracking_uri": store.tracking_uri,
        "model_name": store.model_name,
        "experiment": list(exp),
        "trust_runs": {trust_run_id: uri},
    }
    if load_hints(site_dir, store.tracking_uri, store.model_name) != hints:
        _write(Path(site_dir) / HINTS_FILE, json.dumps(hints, indent=2).encode())


def _write(path: Path, data: bytes) -> None:
    """0600 temp file + rename, without fsync: a cache entry lost in a crash is fetched
    again, and a torn one fails its hash check (records) or its shape check (hints)."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates it 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
