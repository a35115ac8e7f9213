"""Files: the base (safetensors + model.json) and key versions (safetensors + metadata).

Never pickle. Every reader checks format and integrity and raises KeyFormatError with one
clear line; nothing is applied to a model before the whole artifact has been validated.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from adaloc.errors import KeyFormatError
from adaloc.formats import (
    BASE_FILE,
    BASE_FORMAT_VERSION,
    KEY_FORMAT_VERSION,
    MODEL_CARD_FILE,
    sha256_bytes,
    sha256_file,
)
from adaloc.keys import KeyMask
from adaloc.lock import Key, state_sha256

VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IDX, _VAL = "::index", "::value"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename, so readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _payload_sha(tensors: dict[str, torch.Tensor]) -> str:
    return state_sha256(tensors)


def _read_metadata(data: bytes, what: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string, with clear errors."""
    if len(data) < 8:
        raise KeyFormatError(f"{what} is truncated ({len(data)} bytes); fetch it again")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise KeyFormatError(f"{what} is truncated (header says {n} bytes); fetch it again")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KeyFormatError(f"{what} is not a safetensors file ({exc})") from exc
    return header.get("__metadata__") or {}


def encode_key(key: Key, *, value_dtype: str | None = None) -> bytes:
    """Serialize a key version: per keyed tensor an index and a value tensor, plus metadata.

    value_dtype: "float32" (default, exact), or "float16"/"bfloat16" (lossy, smaller).
    """
    dtype_name = value_dtype or "float32"
    if dtype_name not in VALUE_DTYPES:
        raise KeyFormatError(
            f"value dtype {dtype_name!r} is unknown; use one of {list(VALUE_DTYPES)}"
        )
    tensors = {}
    for name in key.mask.names:
        idx = key.mask.indices[name]
        small = idx.numel() == 0 or int(idx.max()) < 2**31
        tensors[name + _IDX] = idx.to(torch.int32 if small else torch.int64).contiguous()
        v = key.values[name]
        if v.is_floating_point() and value_dtype is not None:
            v = v.to(VALUE_DTYPES[dtype_name])
        tensors[name + _VAL] = v.contiguous()
    meta = {
        "format": "adaloc-key",
        "format_version": str(KEY_FORMAT_VERSION),
        "base_sha256": key.base_sha256,
        "version": str(key.version),
        "parent": "" if key.parent is None else str(key.parent),
        "granularity": key.mask.granularity,
        "value_dtype": dtype_name,
        "payload_sha256": _payload_sha(tensors),
    }
    return st_save(tensors, metadata=meta)


def decode_key(data: bytes) -> Key:
    """Parse and validate a key artifact written by :func:`encode_key`."""
    meta = _read_metadata(data, "key artifact")
    if meta.get("format") != "adaloc-key":
        raise KeyFormatError("file is not an adaloc key artifact (no 'adaloc-key' format tag)")
    if meta.get("format_version") != str(KEY_FORMAT_VERSION):
        raise KeyFormatError(
            f"key format version {meta.get('format_version')!r} is not supported "
            f"(this adaloc reads {KEY_FORMAT_VERSION}); upgrade adaloc"
        )
    try:
        tensors = st_load(data)
    except SafetensorError as exc:
        raise KeyFormatError(f"key artifact is corrupted or truncated: {exc}") from exc
    if _payload_sha(tensors) != meta.get("payload_sha256"):
        raise KeyFormatError("key artifact's tensors do not match its checksum (corrupted)")
    names = sorted({k[: -len(_IDX)] for k in tensors if k.endswith(_IDX)})
    indices, values = {}, {}
    for name in names:
        if name + _VAL not in tensors:
            raise KeyFormatError(f"key artifact has indices but no values for {name!r}")
        idx = tensors[name + _IDX].to(torch.int64)
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise KeyFormatError(f"key indices for {name!r} are not sorted and unique")
        # half-precision values are cast to the base's dtype when applied
        indices[name], values[name] = idx, tensors[name + _VAL]
    try:
        version = int(meta["version"])
        parent = int(meta["parent"]) if meta.get("parent") else None
        mask = KeyMask(indices, meta["granularity"])
        return Key(mask, values, meta["base_sha256"], version, parent)
    except (KeyError, ValueError) as exc:
        raise KeyFormatError(f"key artifact metadata is incomplete or invalid: {exc}") from exc


def save_key(key: Key, path: str | Path, *, value_dtype: str | None = None) -> dict:
    """Write a key file atomically; returns {"sha256", "bytes"}."""
    data = encode_key(key, value_dtype=value_dtype)
    atomic_write_bytes(path, data)
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def load_key(path: str | Path) -> Key:
    """Read and validate a key file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"cannot read key file {path}: {exc.strerror}") from exc
    return decode_key(data)


@dataclass
class ModelCard:
    """What is needed to rebuild the network around a base's weights (no secrets)."""

    builder: str
    kwargs: dict
    num_classes: int
    input_shape: list[int]
    key_spec: dict = field(default_factory=dict)
    format_version: int = BASE_FORMAT_VERSION

    def to_json(self) -> str:
        """JSON text of the card."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """Parse a card; unknown fields warn, missing essential fields fail."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyFormatError(f"{MODEL_CARD_FILE} is malformed: {exc}") from exc
        known = {f.name for f in fields(cls)}
        missing = {"builder", "kwargs", "num_classes", "input_shape"} - set(data)
        if missing:
            raise KeyFormatError(f"{MODEL_CARD_FILE} lacks fields {sorted(missing)}")
        if extra := set(data) - known:
            warnings.warn(
                f"ignoring unknown {MODEL_CARD_FILE} fields {sorted(extra)}", stacklevel=2
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def encode_base(base: nn.Module) -> bytes:
    """Serialize the complete state dict (buffers included) of a base."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in base.state_dict().items()}
    meta = {
        "format": "adaloc-base",
        "format_version": str(BASE_FORMAT_VERSION),
        "state_sha256": state_sha256(state),
    }
    return st_save(state, metadata=meta)


def decode_base_state(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a base file and check its embedded fingerprint."""
    meta = _read_metadata(data, BASE_FILE)
    if meta.get("format") != "adaloc-base":
        raise KeyFormatError(f"{BASE_FILE} is not an adaloc base (no 'adaloc-base' format tag)")
    try:
        state = st_load(data)
    except SafetensorError as exc:
        raise KeyFormatError(f"{BASE_FILE} is corrupted or truncated: {exc}") from exc
    if state_sha256(state) != meta.get("state_sha256"):
        raise KeyFormatError(f"{BASE_FILE} does not match its fingerprint (corrupted)")
    return state


def save_base(base: nn.Module, card: ModelCard, directory: str | Path) -> dict:
    """Write base.safetensors + model.json; returns sha256 (state), file_sha256 and bytes."""
    directory = Path(directory)
    data = encode_base(base)
    atomic_write_bytes(directory / BASE_FILE, data)
    atomic_write_bytes(directory / MODEL_CARD_FILE, card.to_json().encode())
    return {"sha256": state_sha256(base), "file_sha256": sha256_bytes(data), "bytes": len(data)}


def build_from_card(card: ModelCard) -> nn.Module:
    """An untrained network of the card's architecture."""
    from adaloc.models import build_model

    return build_model(card.builder, **card.kwargs)


def load_base(directory: str | Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the base network from base.safetensors + model.json."""
    directory = Path(directory)
    try:
        card = ModelCard.from_json((directory / MODEL_CARD_FILE).read_text())
        data = (directory / BASE_FILE).read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"cannot read base in {directory}: {exc.strerror}") from exc
    state = decode_base_state(data)
    model = build_from_card(card)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise KeyFormatError(f"{BASE_FILE} does not fit {card.builder}: {first}") from exc
    return model.eval(), card


__all__ = [
    "ModelCard",
    "atomic_write_bytes",
    "build_from_card",
    "decode_base_state",
    "decode_key",
    "encode_base",
    "encode_key",
    "load_base",
    "load_key",
    "save_base",
    "save_key",
    "sha256_file",
]
