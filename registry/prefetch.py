"""Prefetch of a new sealed key while its targets record is read: one round trip less.

The targets record names the key's file with its signed length and sha256, so waiting for it
before asking for the key costs two round trips in a row. A prefetch asks for the key at its
usual place (``key/key.sealed`` of the run the timestamp names) at the same time, capped at
twice the size of the sealed key the site already holds (a key-only update keeps the key's
size), into a private temp file. It is used only when the verified targets record names
exactly that file and the bytes have the signed length and sha256; otherwise it is dropped
and the key is fetched as before. Nothing is trusted or cached before that check.

A pull by head name (latest, production, an alias) starts one sooner: the owner keeps a copy
of each head's sealed key at a fixed path of its trust run (``trust_io.head_key_path``), so
the copy is asked for in the same round as the timestamp, through a kept presigned URL and
conditionally (a poll that finds the copy unchanged moves no key bytes). Its bytes are used
only when they have the signed length and sha256 of the key the verified head names.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from registry import records as R
from registry import run_io
from registry import trust_io as IO
from registry.sealing import StreamDigest

SLACK = 64 * 1024  # header growth between versions (a new site sealed for, a token)


class KeyPrefetch:
    """One background download of ``path`` in ``run_id`` to ``dst`` (at most ``cap`` bytes)."""

    def __init__(self, store, run_id: str, path: str, dst: Path, cap: int, *, copy=False):
        self.run_id, self.path, self.dst, self.copy = run_id, path, Path(dst), copy
        self._data, self._digest, self.body_sha256 = b"", None, None
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._future = self._pool.submit(self._get, store, cap)

    def _get(self, store, cap: int) -> bool:
        fixed = {"urls": run_io.url_cache(store), "conditional": True} if self.copy else {}
        chunks, digest = [], StreamDigest()

        def keep(chunk: bytes) -> None:  # both hashes are done while the network is waited on
            chunks.append(chunk)
            digest.update(chunk)

        try:
            run_io.fetch_file(
                store, self.run_id, self.path, self.dst, max_bytes=cap, attempts=1,
                label="prefetched key", durable=False, observe=keep, **fixed,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - a failed prefetch only means the usual fetch
            return False
        self._data, self._digest = b"".join(chunks), digest
        return True

    @classmethod
    def start(cls, store, keys_dir: Path, version: int, run_id: str, state: dict | None):
        """A prefetch of key ``version`` when the site holds a previous sealed key to size
        the cap by and none for ``version`` yet; else None."""
        if not state or state.get("version") == version:
            return None
        held = Path(keys_dir) / f"v{state['version']}.sealed"
        if not held.is_file() or (Path(keys_dir) / f"v{version}.sealed").exists():
            return None
        dst, cap = Path(keys_dir) / f".v{version}.prefetch", 2 * held.stat().st_size + SLACK
        return cls(store, run_id, f"{R.KEY_DIR}/{R.SEALED_FILE}", dst, cap)

    @classmethod
    def start_head(cls, store, keys_dir: Path, ref, trust_run: str | None, state: dict | None):
        """A prefetch of head ``ref``'s key copy from ``trust_run`` (the site's hint) when the
        site holds a sealed key to size the cap by; else None."""
        path = IO.head_key_path(ref)
        if path is None or not trust_run or not state:
            return None
        held = Path(keys_dir) / f"v{state['version']}.sealed"
        if not held.is_file():
            return None
        dst, cap = Path(keys_dir) / f".{path.rsplit('/', 1)[1]}.prefetch", 2 * held.stat().st_size
        return cls(store, trust_run, path, dst, cap + SLACK, copy=True)

    def take(self, entry) -> bytes | None:
        """The prefetched bytes when ``entry`` (the signed file entry) names them (or this is
        a head's copy) and they have its length and sha256; else None. After a take,
        :attr:`body_sha256` is the body hash of those bytes (``sealing.StreamDigest``)."""
        if not self._future.result():
            return None
        if not self.copy and (entry.run_id, entry.path) != (self.run_id, self.path):
            return None
        data, digest = self._data, self._digest
        if len(data) != entry.length or digest.whole.hexdigest() != entry.sha256:
            return None
        self.body_sha256 = digest.body_sha256()
        return data

    def keep_as(self, path: Path) -> None:
        """Move the taken download to ``path`` (a cache entry; no second write of it)."""
        os.replace(self.dst, path)

    def close(self) -> None:
        """Wait for the download to end and remove its file."""
        self._pool.shutdown(wait=True)
        self.dst.unlink(missing_ok=True)
