"""Key and base files: round trips, sizes, and refusal of corrupted, truncated or foreign files."""

from __future__ import annotations

import pytest

from adaloc.artifact import (
    ModelCard,
    decode_key,
    encode_base,
    encode_key,
    load_base,
    load_key,
    save_base,
    save_key,
)
from adaloc.errors import KeyFormatError
from adaloc.formats import BASE_FILE, MODEL_CARD_FILE
from adaloc.keys import KeySpec, select_key
from adaloc.lock import lock, state_sha256, unlock
from adaloc.models import build_model


@pytest.fixture()
def locked(trained_tiny):
    mask = select_key(trained_tiny, KeySpec(budget=0.3))
    return lock(trained_tiny, mask)


def test_key_round_trip_is_exact(trained_tiny, locked, tmp_path):
    base, key = locked
    info = save_key(key, tmp_path / "key.safetensors")
    again = load_key(tmp_path / "key.safetensors")
    assert info["bytes"] == (tmp_path / "key.safetensors").stat().st_size
    assert (again.version, again.parent, again.base_sha256) == (1, None, key.base_sha256)
    assert state_sha256(unlock(base, again)) == state_sha256(trained_tiny)


def test_half_precision_key_is_smaller(locked):
    _, key = locked
    assert len(encode_key(key, value_dtype="float16")) < len(encode_key(key))


def test_every_truncation_is_refused(locked):
    _, key = locked
    data = encode_key(key)
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(KeyFormatError):
            decode_key(data[:cut])


def test_flipped_byte_in_values_is_refused(locked):
    _, key = locked
    data = bytearray(encode_key(key))
    data[-3] ^= 0xFF
    with pytest.raises(KeyFormatError, match="checksum"):
        decode_key(bytes(data))
    # checksum=False (bytes the caller authenticated, a sealed key's part): the flip is not
    # looked for, and the layout checks still run.
    flipped = decode_key(bytes(data), checksum=False)
    assert encode_key(flipped) != encode_key(key)  # (the flipped index or value is in it)
    with pytest.raises(KeyFormatError):
        decode_key(bytes(data[: len(data) // 2]), checksum=False)


def test_base_file_is_not_a_key(locked):
    base, _ = locked
    with pytest.raises(KeyFormatError, match="not an adaloc key"):
        decode_key(encode_base(base))


def test_base_round_trip(tmp_path):
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    card = ModelCard(
        "cnn", {"in_channels": 1, "num_classes": 10, "image_size": 28}, 10, [1, 28, 28]
    )
    info = save_base(model, card, tmp_path)
    loaded, card2 = load_base(tmp_path)
    assert card2 == card
    assert state_sha256(loaded) == info["sha256"] == state_sha256(model)
    raw = bytearray((tmp_path / BASE_FILE).read_bytes())
    raw[-1] ^= 1
    (tmp_path / BASE_FILE).write_bytes(bytes(raw))
    with pytest.raises(KeyFormatError, match="fingerprint"):
        load_base(tmp_path)
    (tmp_path / MODEL_CARD_FILE).write_text("{")
    with pytest.raises(KeyFormatError, match="malformed"):
        load_base(tmp_path)


def test_unsorted_indices_inside_one_tensor_are_refused_with_its_name(locked):
    """Indices step down freely where the next tensor starts, never inside one tensor."""
    import json

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from adaloc.artifact import _meta_json, _payload_sha, _read_metadata

    _, key = locked
    data = encode_key(key)
    meta = json.loads(_read_metadata(data, "key")["adaloc"])
    parts = [(name, rows) for name, rows, _, whole in meta["layout"] if not whole]
    assert len(parts) >= 2, "the fixture key needs two row-keyed tensors"
    assert decode_key(data).mask.indices.keys() == key.mask.indices.keys()
    (name, rows), start = parts[1], parts[0][1]
    assert rows >= 2
    tensors = st_load(data)
    index = tensors["index"].clone()
    index[start], index[start + 1] = index[start + 1].clone(), index[start].clone()
    tensors["index"] = index
    meta["payload_sha256"] = _payload_sha(tensors)
    bad = st_save(tensors, metadata=_meta_json(meta))
    with pytest.raises(KeyFormatError, match=f"indices of '{name}' are not sorted"):
        decode_key(bad)
