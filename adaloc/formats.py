"""Artifact file names, format versions and hashing: the one place they are defined."""

from __future__ import annotations

import hashlib
from pathlib import Path

BASE_FILE = "base.safetensors"
MODEL_CARD_FILE = "model.json"
KEY_FILE = "key.safetensors"
TOKEN_FILE = "token.json"

BASE_FORMAT_VERSION = 1
KEY_FORMAT_VERSION = 1
TOKEN_FORMAT_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
