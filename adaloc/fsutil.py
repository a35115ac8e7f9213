"""Crash-safe, private-by-default file writes.

A reader sees the old file or the new one, never a torn one. Every file is owner-only (0600)
from the moment it exists, and every folder the writer creates is 0700: the rule lives here,
once, so a secret written by any module (token, keys, the site's unlocked model) cannot be
world-readable by mistake. Only public keys (``*.pub``), meant to be handed out, get 0644.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644
PUBLIC_SUFFIXES = (".pub",)


def file_mode(path: str | Path) -> int:
    """The mode a file written by :func:`atomic_write_bytes` gets unless told otherwise."""
    return PUBLIC_FILE_MODE if Path(path).suffix in PUBLIC_SUFFIXES else PRIVATE_FILE_MODE


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) as 0700 folders; tighten ``path`` if it exists."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def _make_parents(directory: Path) -> None:
    # Folders we create are 0700; folders that already exist are left as the user made them.
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent writer made it
            d.mkdir(mode=PRIVATE_DIR_MODE)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and os.replace.

    ``mode`` defaults to :func:`file_mode` (0600, 0644 for ``*.pub``); it is set on the temp
    file before any byte is written, so the secret is never readable by others, even briefly.
    """
    path = Path(path)
    _make_parents(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode(path) if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
