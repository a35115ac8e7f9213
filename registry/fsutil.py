"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
from pathlib import Path

from adaloc.fsutil import PRIVATE_FILE_MODE, atomic_write_bytes, file_mode, private_dir
from registry.errors import BadFileError

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


def read_json(path: str | Path, *, expect: type = dict) -> dict | list | None:
    """Return the JSON object (or ``expect=list``: array) at ``path``; None when missing.

    BadFileError names the file when it is unreadable, not UTF-8 JSON, or not an ``expect``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BadFileError(f"{path} is not readable: {err}") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise BadFileError(
            f"{path} is not valid JSON ({str(err)[:120]}); restore it or re-create it"
        ) from err
    if not isinstance(data, expect):
        raise BadFileError(
            f"{path} holds a JSON {type(data).__name__}; expected a JSON "
            f"{'object' if expect is dict else 'array'}"
        )
    return data
