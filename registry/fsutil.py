"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
from pathlib import Path

from adaloc.fsutil import PRIVATE_FILE_MODE, atomic_write_bytes, file_mode, private_dir

__all__ = [
    "PRIVATE_FILE_MODE",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_mode",
    "private_dir",
    "read_json",
]


def atomic_write_json(path: str | Path, obj: object, *, mode: int | None = None) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON (0600 unless ``mode`` says)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode(), mode=mode)


def read_json(path: str | Path) -> dict | None:
    """Return the JSON object stored at ``path``, or None when the file does not exist."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
