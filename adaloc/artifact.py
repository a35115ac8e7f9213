"""Files: the base (safetensors + model.json) and key versions (safetensors + metadata).

Never pickle. Every reader checks format and integrity and raises KeyFormatError with one
clear line; nothing is applied to a model before the whole artifact has been validated.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from adaloc.errors import AdalocError, KeyFormatError
from adaloc.formats import (
    BASE_FILE,
    BASE_FORMAT_VERSION,
    KEY_FORMAT_VERSION,
    MODEL_CARD_FILE,
    sha256_bytes,
    sha256_file,
)
from adaloc.fsutil import atomic_write_bytes
from adaloc.keys import KeyMask
from adaloc.lock import Key, state_sha256

VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _payload_sha(tensors: dict[str, torch.Tensor]) -> str:
    return state_sha256(tensors)


def _read_metadata(data: bytes, what: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string, with clear errors."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise KeyFormatError(f"{what} is a {type(data).__name__}, not bytes")
    if len(data) < 8:
        raise KeyFormatError(f"{what} is truncated ({len(data)} bytes); fetch it again")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise KeyFormatError(f"{what} is truncated (header says {n} bytes); fetch it again")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise KeyFormatError(f"{what} is not a safetensors file ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(meta or {}, dict):
        raise KeyFormatError(f"{what} is not a safetensors file (header is not a JSON object)")
    return meta or {}


def _meta_json(meta: dict) -> dict[str, str]:
    # one sorted JSON entry: safetensors writes its metadata map in hash order, and the
    # registry needs identical bytes for identical keys (idempotent publication)
    return {"adaloc": json.dumps(meta, sort_keys=True, separators=(",", ":"))}


def _parse_meta(raw: dict[str, str], what: str) -> dict:
    try:
        meta = json.loads(raw.get("adaloc", ""))
    except (TypeError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise KeyFormatError(f"{what} has no adaloc metadata; it is not an adaloc file")
    return meta


def encode_key(key: Key, *, value_dtype: str | None = None) -> bytes:
    """Serialize a key version compactly and deterministically (same key, same bytes).

    Two tensors: ``index`` (int32/int64, the row or element indices of every keyed tensor
    that is not keyed whole, concatenated) and ``value`` (all key values, concatenated); a
    layout table in the metadata says which slice belongs to which tensor. value_dtype:
    "float32" (default, exact), or "float16"/"bfloat16" (lossy, smaller).
    """
    dtype_name = value_dtype or "float32"
    if dtype_name not in VALUE_DTYPES:
        raise KeyFormatError(
            f"value dtype {dtype_name!r} is unknown; use one of {list(VALUE_DTYPES)}"
        )
    layout, idx_parts, val_parts = [], [], []
    for name in key.mask.names:
        idx, v = key.mask.indices[name], key.values[name]
        rows, width = int(idx.numel()), int(v.numel() // max(idx.numel(), 1))
        # a tensor keyed whole needs no indices: its rows are 0..n-1 (norm layers, the head)
        whole = bool(rows == 0 or torch.equal(idx, torch.arange(rows)))
        layout.append([name, rows, width, whole])
        if not whole:
            idx_parts.append(idx)
        val_parts.append(v.reshape(-1).to(VALUE_DTYPES[dtype_name]))
    index = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.int64)
    small = index.numel() == 0 or int(index.max()) < 2**31
    tensors = {
        "index": index.to(torch.int32 if small else torch.int64).contiguous(),
        "value": (torch.cat(val_parts) if val_parts else torch.zeros(0)).contiguous(),
    }
    meta = {
        "format": "adaloc-key",
        "format_version": KEY_FORMAT_VERSION,
        "base_sha256": key.base_sha256,
        "version": key.version,
        "parent": key.parent,
        "granularity": key.mask.granularity,
        "value_dtype": dtype_name,
        "layout": layout,
        "payload_sha256": _payload_sha(tensors),
    }
    return st_save(tensors, metadata=_meta_json(meta))


def decode_key(data: bytes, *, checksum: bool = True) -> Key:
    """Parse and validate a key artifact written by :func:`encode_key`.

    ``checksum=False`` skips re-hashing the tensors against the stored payload checksum, for
    bytes the caller has authenticated (a sealed key's AEAD part under an owner-signed
    header): the checksum guards plain files against corruption, which that rules out.
    The layout, dtype and index checks run either way."""
    meta = _parse_meta(_read_metadata(data, "key artifact"), "key artifact")
    if meta.get("format") != "adaloc-key":
        raise KeyFormatError("file is not an adaloc key artifact (no 'adaloc-key' format tag)")
    if meta.get("format_version") != KEY_FORMAT_VERSION:
        raise KeyFormatError(
            f"key format version {meta.get('format_version')!r} is not supported "
            f"(this adaloc reads {KEY_FORMAT_VERSION}); upgrade adaloc"
        )
    tensors = _st_load(data, "key artifact")
    if set(tensors) != {"index", "value"} or (
        checksum and _payload_sha(tensors) != meta.get("payload_sha256")
    ):
        raise KeyFormatError("key artifact's tensors do not match its checksum (corrupted)")
    index, value = tensors["index"], tensors["value"]
    if index.dtype not in (torch.int32, torch.int64) or value.dtype not in VALUE_DTYPES.values():
        raise KeyFormatError(f"key artifact has tensors of dtype {index.dtype}/{value.dtype}")
    index = index.reshape(-1).to(torch.int64)
    value = value.reshape(-1)
    indices, values, i, v, starts = {}, {}, 0, 0, []
    try:
        for name, rows, width, whole in meta["layout"]:
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (rows, width)):
                raise ValueError(f"layout of {name!r} has non-integer sizes")
            if rows < 0 or width < 0 or v + rows * width > value.numel():
                raise ValueError(f"layout of {name!r} runs past the stored tensors")
            idx = torch.arange(rows) if whole else index[i : i + rows]
            if not whole:
                starts.append((i, name))
            i += 0 if whole else rows
            if idx.numel() != rows or v + rows * width > value.numel():
                raise ValueError(f"layout of {name!r} runs past the stored tensors")
            # half-precision values are cast to the base's dtype when applied
            indices[name], values[name] = idx, value[v : v + rows * width].reshape(rows, width)
            v += rows * width
        if i != index.numel() or v != value.numel():
            raise ValueError("stored tensors are longer than the layout says")
        _check_sorted(index, starts)
        mask = KeyMask(indices, meta["granularity"])
        return Key(mask, values, meta["base_sha256"], int(meta["version"]), meta["parent"])
    except (KeyError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise KeyFormatError(f"key artifact metadata is incomplete or invalid: {exc}") from exc


def _check_sorted(index: torch.Tensor, starts: list[tuple[int, str]]) -> None:
    """Every tensor's slice of ``index`` strictly increasing (sorted, unique), checked in one
    pass over the concatenation: a step down is allowed only where a new tensor starts."""
    if index.numel() < 2:
        return
    up = index[1:] > index[:-1]
    first = [s for s, _ in starts if s > 0]
    if first:
        up[torch.tensor(first) - 1] = True
    if bool(up.all()):
        return
    bad = int((~up).nonzero()[0]) + 1
    name = next(n for s, n in reversed(starts) if s <= bad - 1)
    raise ValueError(f"indices of {name!r} are not sorted and unique")


def _st_load(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """safetensors' own parser; any failure becomes KeyFormatError naming ``what``."""
    try:
        return st_load(bytes(data))
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise KeyFormatError(f"{what} is corrupted or truncated: {first}") from exc


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
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parse a card; unknown fields warn, missing essential fields fail, types are checked."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise KeyFormatError(f"{MODEL_CARD_FILE} is malformed: {exc}") from exc
        if not isinstance(data, dict):
            raise KeyFormatError(
                f"{MODEL_CARD_FILE} is a JSON {type(data).__name__}; expected an object"
            )
        known = {f.name for f in fields(cls)}
        missing = {"builder", "kwargs", "num_classes", "input_shape"} - set(data)
        if missing:
            raise KeyFormatError(f"{MODEL_CARD_FILE} lacks fields {sorted(missing)}")
        _check_card(data)
        if extra := set(data) - known:
            warnings.warn(
                f"ignoring unknown {MODEL_CARD_FILE} fields {sorted(extra)}", stacklevel=2
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def _check_card(data: dict) -> None:
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    shape = data["input_shape"]
    bad = [
        name
        for name, ok in (
            ("builder", isinstance(data["builder"], str)),
            ("kwargs", isinstance(data["kwargs"], dict)),
            ("num_classes", is_int(data["num_classes"]) and data["num_classes"] > 0),
            ("input_shape", isinstance(shape, list) and all(is_int(d) and d > 0 for d in shape)),
            ("key_spec", isinstance(data.get("key_spec", {}), dict)),
            ("format_version", is_int(data.get("format_version", BASE_FORMAT_VERSION))),
        )
        if not ok
    ]
    if bad:
        raise KeyFormatError(f"{MODEL_CARD_FILE} has fields of the wrong type: {bad}")


def encode_base(base: nn.Module) -> bytes:
    """Serialize the complete state dict (buffers included) of a base."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in base.state_dict().items()}
    meta = {
        "format": "adaloc-base",
        "format_version": BASE_FORMAT_VERSION,
        "state_sha256": state_sha256(state),
    }
    return st_save(state, metadata=_meta_json(meta))


def decode_base(data: bytes, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Parse a base file; returns its state dict and its fingerprint.

    ``verify=False`` skips re-hashing the state and returns the fingerprint the file claims:
    only for callers that check the final result against a signed hash anyway.
    """
    meta = _parse_meta(_read_metadata(data, BASE_FILE), BASE_FILE)
    if meta.get("format") != "adaloc-base":
        raise KeyFormatError(f"{BASE_FILE} is not an adaloc base (no 'adaloc-base' format tag)")
    state = _st_load(data, BASE_FILE)
    if not verify:
        return state, str(meta.get("state_sha256"))
    sha = state_sha256(state)
    if sha != meta.get("state_sha256"):
        raise KeyFormatError(f"{BASE_FILE} does not match its fingerprint (corrupted)")
    return state, sha


def decode_base_state(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a base file and check its embedded fingerprint."""
    return decode_base(data)[0]


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
        card = ModelCard.from_json((directory / MODEL_CARD_FILE).read_bytes())
        data = (directory / BASE_FILE).read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"cannot read base in {directory}: {exc.strerror}") from exc
    state = decode_base_state(data)
    try:
        model = build_from_card(card)
    except (AdalocError, TypeError, ValueError, RuntimeError) as exc:
        raise KeyFormatError(
            f"{MODEL_CARD_FILE} does not describe a buildable model ({card.builder!r}): {exc}"
        ) from exc
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise KeyFormatError(f"{BASE_FILE} does not fit {card.builder}: {first}") from exc
    return model.eval(), card


__all__ = [
    "ModelCard",
    "atomic_write_bytes",
    "build_from_card",
    "decode_base",
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
