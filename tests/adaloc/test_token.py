"""M-LOCK tokens: patterns, stamping, forgeries, JSON round-trip and bad input."""

from __future__ import annotations

import dataclasses
import json
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from adaloc.errors import TokenError
from adaloc.formats import TOKEN_FORMAT_VERSION
from adaloc.token import (
    CORNERS,
    DEFAULT_BINARY_SIZE,
    MIN_SECRET_BITS,
    PATTERNS,
    Token,
    stamp,
)
from adaloc.token_forgery import forged_tensors, near_tensors, near_tokens, random_tokens

FIXED_COUNTS = {"pixel": 1, "dots3x3-diagonal": 3, "dots3x3-die5": 5, "square3x3": 9}


@pytest.mark.parametrize("kind", [p for p in PATTERNS if p != "image"])
def test_generate_every_pattern(kind):
    tok = Token.generate(kind, seed=3)
    n = tok.size
    assert np.asarray(tok.pixels).shape[1:] == (n, n)
    assert np.asarray(tok.mask).shape == (n, n)
    if kind in FIXED_COUNTS:
        assert np.asarray(tok.mask).sum() == FIXED_COUNTS[kind]
    if kind == "patch4x4-rgb":
        assert tok.channels == 3 and n == 4


def test_binary_is_seeded_and_sized():
    a, b = Token.generate("binary", 5, seed=1), Token.generate("binary", 5, seed=1)
    c = Token.generate("binary", 5, seed=2)
    assert a == b and a != c and a.size == 5
    bits = np.asarray(a.pixels)[0]
    assert set(np.unique(bits)) <= {0.0, 1.0} and 0 < bits.sum() < 25


@pytest.mark.parametrize("corner", CORNERS)
def test_stamp_fixed_corner_writes_exactly_the_token(corner):
    tok = Token.generate("binary", 4, seed=5, placement=corner, margin=1)
    images = torch.full((3, 1, 10, 12), 0.5)
    out = stamp(images, tok)
    top = 1 if corner.startswith("top") else 10 - 4 - 1
    left = 1 if corner.endswith("left") else 12 - 4 - 1
    want = torch.tensor(tok.pixels)[0]
    for i in range(3):
        assert torch.equal(out[i, 0, top : top + 4, left : left + 4], want)
    changed = (out != images).any(0).any(0)
    assert not changed[: max(top, 0)].any() and not changed[top + 4 :].any()
    assert torch.equal(images, torch.full((3, 1, 10, 12), 0.5)), "input must stay untouched"


def test_dot_pattern_keeps_unstamped_pixels():
    tok = Token.generate("dots3x3-die5", placement="top-left", color=(0.9,))
    images = torch.rand(2, 1, 8, 8)
    out = stamp(images, tok)
    mask = torch.tensor(tok.mask).bool()
    assert torch.all(out[:, 0, :3, :3][:, mask] == 0.9)
    assert torch.equal(out[:, 0, :3, :3][:, ~mask], images[:, 0, :3, :3][:, ~mask])


def test_channels_any_size_and_single_image():
    gray = Token.generate("square3x3", color=(0.5,))
    rgb_img = torch.zeros(2, 3, 32, 20)
    out = stamp(rgb_img, gray)  # 1-channel token broadcast to RGB
    assert torch.all(out[:, :, -3:, -3:] == 0.5)
    rgb = Token.generate("patch4x4-rgb", seed=0)
    one = stamp(torch.zeros(1, 9, 9), rgb)  # unbatched [C, H, W], RGB token -> luminance
    lum = (torch.tensor(rgb.pixels) * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    assert one.shape == (1, 9, 9)
    assert torch.allclose(one[0, -4:, -4:], lum)
    assert stamp(rgb_img, rgb).dtype == rgb_img.dtype


def test_stamp_keeps_device_and_dtype():
    tok = Token.generate("binary", 3, seed=0)
    images = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    out = stamp(images, tok)
    assert out.device == images.device and out.dtype == torch.float64


def test_random_placement_per_sample_and_reproducible():
    tok = Token.generate("binary", 3, seed=4, placement="random")
    images = torch.zeros(64, 1, 16, 16)
    a = stamp(images, tok, generator=torch.Generator().manual_seed(0))
    b = stamp(images, tok, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    positions = {tuple(torch.nonzero(a[i, 0])[0].tolist()) for i in range(64)}
    assert len(positions) > 10, "random placement should vary between samples"
    want = float(np.asarray(tok.pixels).sum())
    assert torch.allclose(a.sum((1, 2, 3)), torch.full((64,), want))  # whole token, no clipping


def test_random_tokens_are_distinct_forgeries():
    tok = Token.generate("binary", 4, seed=9)
    forged = random_tokens(tok, 20, seed=0)
    assert len(forged) == 20 and all(f != tok for f in forged)
    assert all((f.pattern, f.size, f.placement) == ("binary", 4, tok.placement) for f in forged)
    assert len({f.fingerprint() for f in forged}) == 20
    assert random_tokens(tok, 20, seed=0) == forged
    dots = Token.generate("dots3x3-diagonal")
    assert all(f.mask != dots.mask for f in random_tokens(dots, 10, seed=1))


def test_forged_tensors_shapes_and_true_flag():
    tok = Token.generate("binary", 2, seed=1)
    pix, mask, is_true = forged_tensors(tok, 256, 3, torch.Generator().manual_seed(0))
    assert pix.shape == (256, 3, 2, 2) and mask.shape == (256, 2, 2) and is_true.shape == (256,)
    # 2x2 bits: 1 in 16 draws equals the token, and the flag must say so exactly.
    expect = (pix[:, 0] == torch.tensor(tok.pixels)[0]).flatten(1).all(1)
    assert torch.equal(is_true, expect) and is_true.any()


@pytest.mark.parametrize("kind", ["binary", "dots3x3-die5", "patch4x4-rgb", "pixel"])
def test_near_tokens_change_one_to_three_cells(kind):
    tok = Token.generate(kind, 4 if kind == "binary" else None, seed=5)
    near = near_tokens(tok, 20, seed=0)
    assert len(near) == 20 and all(t != tok for t in near)
    assert near_tokens(tok, 20, seed=0) == near
    for t in near:
        # a cell is changed when its mask bit or any of its channel values differ
        changed = (np.asarray(t.mask) != np.asarray(tok.mask)) | (
            np.asarray(t.pixels) != np.asarray(tok.pixels)
        ).any(0)
        assert 1 <= changed.sum() <= min(3, tok.size**2)


def test_near_tensors_flag_draws_equal_to_the_token():
    tok = Token.generate("pixel")  # 1x1: a changed cell gets a random value, never equal
    _, _, same = near_tensors(tok, 64, 1, torch.Generator().manual_seed(0))
    assert not same.any()
    tok = Token.generate("binary", 4, seed=2)
    pix, mask, same = near_tensors(tok, 256, 3, torch.Generator().manual_seed(0))
    assert pix.shape == (256, 3, 4, 4) and mask.shape == (256, 4, 4) and not same.any()
    with pytest.raises(TokenError, match="max_changes=0"):
        near_tensors(tok, 4, 3, max_changes=0)


def test_json_and_bytes_round_trip(tmp_path):
    tok = Token.generate("patch4x4-rgb", seed=11, placement="top-right", margin=2)
    assert Token.from_json(tok.to_json()) == tok
    assert Token.from_bytes(tok.to_bytes()) == tok
    tok.save(tmp_path / "token.json")
    assert Token.load(tmp_path / "token.json") == tok
    data = json.loads(tok.to_json())
    assert data["format_version"] == TOKEN_FORMAT_VERSION
    assert tok.to_bytes() == Token.from_bytes(tok.to_bytes()).to_bytes()  # stable bytes


def test_repr_hides_the_secret():
    tok = Token.generate("binary", 4, seed=2)
    text = repr(tok)
    assert "pixels" not in text and "mask" not in text and tok.fingerprint()[:12] in text


def test_format_version_and_fields_are_checked():
    data = Token.generate("binary", 3).to_dict()
    with pytest.raises(TokenError, match="format_version"):
        Token.from_dict({**data, "format_version": TOKEN_FORMAT_VERSION + 1})
    with pytest.raises(TokenError, match="lacks"):
        Token.from_dict({k: v for k, v in data.items() if k != "pixels"})
    with pytest.warns(UserWarning, match="future_field"):
        Token.from_dict({**data, "future_field": 1})
    with pytest.raises(TokenError, match="not valid JSON"):
        Token.from_bytes(b"\x89PNG not json")


def test_from_image_uses_alpha_as_mask(tmp_path):
    arr = np.zeros((5, 5, 4), dtype=np.uint8)
    arr[..., 0] = 255
    arr[2, 2, 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    tok = Token.from_image(tmp_path / "t.png", placement="top-left")
    assert tok.pattern == "image" and tok.size == 5 and tok.channels == 3
    assert np.asarray(tok.mask).sum() == 1
    out = stamp(torch.zeros(1, 3, 8, 8), tok)
    assert out[0, :, 2, 2].tolist() == [1.0, 0.0, 0.0] and out.sum() == 1.0
    Image.fromarray(np.full((6, 6), 128, np.uint8)).save(tmp_path / "g.png")
    assert Token.from_image(tmp_path / "g.png", size=3).channels == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: Token.generate("zigzag"), "'zigzag'"),
        (lambda: Token.generate("square3x3", size=5), "size=5"),
        (lambda: Token.generate("binary", 0), "size=0"),
        (lambda: Token.generate("binary", 3, placement="middle"), "'middle'"),
        (lambda: Token.generate("binary", 3, color=(2.0,)), "color"),
        (lambda: stamp(torch.zeros(1, 1, 4, 4), Token.generate("binary", 5)), "5x5.*4x4"),
        (lambda: stamp(torch.zeros(1, 1, 4, 4), Token.generate("binary", 3, margin=2)), "4x4"),
        (lambda: stamp(torch.zeros(4, 4), Token.generate("binary", 3)), r"\[B, C, H, W\]"),
        (lambda: stamp(torch.zeros(1, 2, 8, 8), Token.generate("patch4x4-rgb")), "3-channel"),
    ],
)
def test_bad_input_raises_token_error(call, match):
    with pytest.raises(TokenError, match=match):
        call()


def test_token_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "token.png"
    bad.write_text("definitely not pixels")
    with pytest.raises(TokenError, match="token.png.*not a readable image"):
        Token.from_image(bad)
    with pytest.raises(TokenError, match="not a readable image"):
        Token.from_image(tmp_path / "missing.png")


def test_invalid_fields_rejected_on_construction():
    tok = Token.generate("binary", 3)
    with pytest.raises(TokenError, match=r"\[0, 1\]"):
        dataclasses.replace(tok, pixels=[[[2.0] * 3] * 3])
    with pytest.raises(TokenError, match="no pixel"):
        dataclasses.replace(tok, mask=[[0] * 3] * 3)


def test_default_token_is_csprng_binary_with_at_least_128_bits():
    a, b = Token.generate(), Token.generate()
    assert a.pattern == "binary" and a.size == DEFAULT_BINARY_SIZE and a.seed is None
    assert a.entropy_bits() >= MIN_SECRET_BITS and a != b  # 2^-144 chance of a false failure
    # every cell is a fair coin: over 20 tokens (2880 cells) the share of 1s is ~0.5
    ones = np.mean([np.asarray(Token.generate().pixels) for _ in range(20)])
    assert 0.45 < ones < 0.55
    assert Token.generate("patch4x4-rgb").entropy_bits() == 384
    assert Token.generate("square3x3").entropy_bits() == 0
    assert Token.generate("binary", 4, seed=1).entropy_bits() == pytest.approx(np.log2(2**16 - 2))


def test_save_is_atomic_and_private_from_the_start(tmp_path):
    tok = Token.generate()
    path = tok.save(tmp_path / "owner" / "token.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert Token.load(path) == tok and list(path.parent.iterdir()) == [path]


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage\xff", b"[1, 2]", b'{"pattern": "binary"}', b'{"format_version": 1, '
     b'"pattern": "binary", "size": 2, "placement": "top-left", "pixels": "ab", "mask": 3}'],
)  # fmt: skip
def test_load_bad_token_file_is_a_token_error(tmp_path, content):
    (tmp_path / "token.json").write_bytes(content)
    with pytest.raises(TokenError, match="token"):
        Token.load(tmp_path / "token.json")
    with pytest.raises(TokenError, match="not found"):
        Token.load(tmp_path / "missing.json")
