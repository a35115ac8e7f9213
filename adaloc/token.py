"""M-LOCK tokens: the secret input stamp that unlocks a token-locked model.

A token is a small ``[C, N, N]`` patch of pixel values in [0, 1] plus an ``[N, N]`` mask of the
pixels it overwrites, and a placement (a fixed corner or a random position per sample). It is
a secret like the AdaLoc key: serialize it with :meth:`Token.to_bytes` next to the key version
and never log it — ``repr`` shows only a fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adaloc.errors import TokenError
from adaloc.formats import TOKEN_FORMAT_VERSION, sha256_bytes
from adaloc.fsutil import PRIVATE_FILE_MODE, atomic_write_bytes

PATTERNS = (
    "pixel",
    "dots3x3-diagonal",
    "dots3x3-die5",
    "square3x3",
    "patch4x4-rgb",
    "binary",
    "image",
)
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
PLACEMENTS = (*CORNERS, "random")

# Fixed binary layouts of the method's public code (1 = the pixel is stamped).
_FIXED_MASKS = {
    "pixel": [[1]],
    "dots3x3-diagonal": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    "dots3x3-die5": [[1, 0, 1], [0, 1, 0], [1, 0, 1]],
    "square3x3": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
}
# Side of the default binary token: 12x12 = 144 random bits, the smallest square >= 128 bits
# (an 11x11 token has 121), so an exhaustive search is out of reach. Fashion-MNIST's 28x28
# images leave room for it in a corner.
DEFAULT_BINARY_SIZE = 12
MIN_SECRET_BITS = 128
_ESSENTIAL_KEYS = ("format_version", "pattern", "size", "placement", "pixels", "mask")
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class Token:
    """An M-LOCK token: stamp pixels, the mask of stamped pixels, and where they go."""

    pattern: str
    size: int
    pixels: list = field(repr=False)  # [C][N][N] floats in [0, 1], C = 1 or 3
    mask: list = field(repr=False)  # [N][N] of 0/1: which pixels the stamp overwrites
    placement: str = "bottom-right"
    margin: int = 0  # distance in pixels from the chosen corner
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise TokenError(f"unknown token pattern {self.pattern!r}; expected one of {PATTERNS}")
        if self.placement not in PLACEMENTS:
            raise TokenError(
                f"unknown token placement {self.placement!r}; expected one of {PLACEMENTS}"
            )
        if not isinstance(self.size, int) or self.size < 1:
            raise TokenError(f"token size={self.size!r}; expected a positive integer")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise TokenError(f"token margin={self.margin!r}; expected an integer >= 0")
        try:
            pix = np.asarray(self.pixels, dtype=np.float32)
            msk = np.asarray(self.mask)
        except (TypeError, ValueError) as exc:
            raise TokenError(f"token pixels/mask are not numeric arrays: {exc}") from exc
        n = self.size
        if pix.ndim != 3 or pix.shape[0] not in (1, 3) or pix.shape[1:] != (n, n):
            raise TokenError(f"token pixels have shape {pix.shape}; expected (1 or 3, {n}, {n})")
        if msk.shape != (n, n) or not np.isin(msk, (0, 1)).all():
            raise TokenError(f"token mask has shape {msk.shape}; expected ({n}, {n}) of 0/1")
        if not np.isfinite(pix).all() or pix.min() < 0.0 or pix.max() > 1.0:
            raise TokenError("token pixel values must be finite and in [0, 1]")
        if msk.sum() == 0:
            raise TokenError("token mask stamps no pixel; expected at least one 1")
        self.pixels = pix.tolist()
        self.mask = msk.astype(int).tolist()

    def __repr__(self) -> str:
        # The pixels are the secret: show only what identifies the token, never its content.
        return (
            f"Token(pattern={self.pattern!r}, size={self.size}, placement={self.placement!r}, "
            f"channels={self.channels}, fingerprint={self.fingerprint()[:12]})"
        )

    @property
    def channels(self) -> int:
        """Number of colour channels of the stamp (1 or 3)."""
        return len(self.pixels)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def generate(
        cls,
        kind: str = "binary",
        size: int | None = None,
        seed: int | None = None,
        *,
        placement: str = "bottom-right",
        color: tuple[float, ...] = (1.0,),
        margin: int = 0,
    ) -> Token:
        """Build a token of a named pattern; ``binary`` and ``patch4x4-rgb`` are random.

        Without ``seed`` the random cells come from the OS CSPRNG (:mod:`secrets`): that is
        the only way to make a real token. A ``seed`` gives a reproducible token for tests and
        benchmarks; never use one for a deployed token (a logged seed rebuilds the token).
        ``binary`` defaults to ``DEFAULT_BINARY_SIZE`` (144 bits).
        """
        if kind not in PATTERNS or kind == "image":
            choices = tuple(p for p in PATTERNS if p != "image")
            hint = " (use Token.from_image for 'image')" if kind == "image" else ""
            raise TokenError(f"unknown token pattern {kind!r}; expected one of {choices}{hint}")
        col = np.asarray(color, dtype=np.float32).reshape(-1)
        if col.size not in (1, 3) or col.min() < 0 or col.max() > 1:
            raise TokenError(f"token color={color!r}; expected 1 or 3 values in [0, 1]")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TokenError(f"token seed={seed!r}; expected an integer or None (CSPRNG)")
        rng = None if seed is None else np.random.default_rng(seed)
        if kind in _FIXED_MASKS:
            mask = np.asarray(_FIXED_MASKS[kind])
            n = mask.shape[0]
            if size not in (None, n):
                raise TokenError(f"token pattern {kind!r} has size {n}, got size={size!r}")
            pixels = np.broadcast_to(col[:, None, None], (col.size, n, n)) * mask
        elif kind == "patch4x4-rgb":
            if size not in (None, 4):
                raise TokenError(f"token pattern {kind!r} has size 4, got size={size!r}")
            n, mask = 4, np.ones((4, 4), dtype=int)
            pixels = _random_levels(rng, (3, 4, 4))
        else:  # binary: a random NxN pattern of colour / black, every pixel overwritten
            n = DEFAULT_BINARY_SIZE if size is None else size
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise TokenError(f"token size={size!r}; expected a positive integer")
            bits = _random_bits(rng, n)
            mask = np.ones((n, n), dtype=int)
            pixels = col[:, None, None] * bits[None]
        return cls(kind, n, pixels, mask, placement=placement, margin=margin, seed=seed)

    @classmethod
    def from_image(
        cls, path: str | Path, *, size: int | None = None, placement: str = "bottom-right"
    ) -> Token:
        """Load a custom token from a small image file (alpha, if any, becomes the mask)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                alpha = np.asarray(img.getchannel("A")) if "A" in img.getbands() else None
                gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
                img = img.convert("L" if gray else "RGB")
                if size is not None:
                    img = img.resize((size, size), Image.Resampling.NEAREST)
                    if alpha is not None:
                        alpha = np.asarray(
                            Image.fromarray(alpha).resize((size, size), Image.Resampling.NEAREST)
                        )
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise TokenError(f"token file {str(path)!r} is not a readable image: {exc}") from exc
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        h, w = arr.shape[1:]
        if h != w:
            raise TokenError(f"token image {str(path)!r} is {h}x{w}; expected a square image")
        mask = np.ones((h, w), dtype=int) if alpha is None else (alpha > 0).astype(int)
        return cls("image", int(h), arr, mask, placement=placement)

    # -- serialization (secret: seal it, never log it) ------------------------------------
    def to_dict(self) -> dict:
        """Plain dict with the format version; contains the secret pixels."""
        return {"format_version": TOKEN_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Token:
        """Inverse of :meth:`to_dict`; unknown keys warn, missing essential keys fail."""
        if not isinstance(data, dict):
            raise TokenError(f"token data is a {type(data).__name__}; expected a JSON object")
        missing = [k for k in _ESSENTIAL_KEYS if k not in data]
        if missing:
            raise TokenError(f"token data lacks {missing}; is this a token file?")
        version = data["format_version"]
        if not isinstance(version, int) or version > TOKEN_FORMAT_VERSION:
            raise TokenError(
                f"token format_version={version!r}; this adaloc reads <= {TOKEN_FORMAT_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"format_version"})
        if unknown:
            warnings.warn(f"ignoring unknown token fields {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError, OverflowError) as exc:  # wrong field types
            raise TokenError(f"token data has a field of the wrong type: {exc}") from exc

    def to_json(self) -> str:
        """JSON text (compact, sorted keys, so equal tokens give equal bytes)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Token:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:  # incl. Unicode errors
            raise TokenError(f"token data is not valid JSON: {str(exc)[:120]}") from exc
        return cls.from_dict(data)

    def to_bytes(self) -> bytes:
        """UTF-8 JSON bytes, for the registry to seal next to the key (``TOKEN_FILE``)."""
        return self.to_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Token:
        """Inverse of :meth:`to_bytes`."""
        return cls.from_json(data)

    def save(self, path: str | Path) -> Path:
        """Write the token file atomically with mode 0600 from the start (it is a secret)."""
        return atomic_write_bytes(path, self.to_bytes(), mode=PRIVATE_FILE_MODE)

    @classmethod
    def load(cls, path: str | Path) -> Token:
        """Read a token file written by :meth:`save`; TokenError for a missing or bad file."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise TokenError(f"token file {str(path)!r} not found") from exc
        except (IsADirectoryError, PermissionError) as exc:
            raise TokenError(f"token file {str(path)!r} is not readable: {exc}") from exc
        try:
            return cls.from_bytes(data)
        except TokenError as exc:
            raise TokenError(f"token file {str(path)!r}: {exc}") from exc

    def entropy_bits(self) -> float:
        """Bits an attacker must guess, knowing the pattern, size, colour and placement.

        Binary tokens: one bit per cell; colour patches: 8 bits per channel value (they
        are drawn as 8-bit levels); fixed layouts and images: 0 (public or chosen by a
        person, so not counted).
        """
        if self.pattern == "binary":
            # all-0 and all-1 are never drawn: log2(2^cells - 2)
            return math.log2(max(2 ** (self.size * self.size) - 2, 1))
        if self.pattern == "patch4x4-rgb":
            return 8.0 * self.channels * self.size * self.size
        return 0.0

    def fingerprint(self) -> str:
        """sha256 of the serialized token: safe to log, identifies the token."""
        return sha256_bytes(self.to_bytes())

    # -- tensors --------------------------------------------------------------------------
    def tensors(self, channels: int, device=None, dtype=torch.float32):
        """``(pixels [channels, N, N], mask [N, N] bool)`` adapted to the image channels."""
        pix = torch.tensor(self.pixels, dtype=dtype, device=device)
        return _match_channels(pix, channels), torch.tensor(self.mask, device=device).bool()


def _random_bits(rng: np.random.Generator | None, n: int) -> np.ndarray:
    """Random 0/1 NxN pattern that is neither all-0 nor all-1 (those carry no secret).

    ``rng=None`` draws from the OS CSPRNG (``secrets``); a numpy generator is for seeded,
    reproducible tokens only.
    """
    while True:
        if rng is None:
            raw = np.frombuffer(secrets.token_bytes((n * n + 7) // 8), dtype=np.uint8)
            bits = np.unpackbits(raw)[: n * n].reshape(n, n).astype(np.float32)
        else:
            bits = rng.integers(0, 2, size=(n, n)).astype(np.float32)
        if n * n == 1 or 0 < bits.sum() < n * n:
            return bits


def _random_levels(rng: np.random.Generator | None, shape: tuple[int, ...]) -> np.ndarray:
    """Random pixel values in [0, 1]: 8-bit levels from the CSPRNG, or floats from ``rng``."""
    if rng is None:
        raw = np.frombuffer(secrets.token_bytes(math.prod(shape)), dtype=np.uint8)
        return (raw.reshape(shape) / 255.0).astype(np.float32)
    return rng.random(shape, dtype=np.float32)


def _match_channels(pix: torch.Tensor, channels: int) -> torch.Tensor:
    """Broadcast a 1-channel stamp to RGB, or turn an RGB stamp into luminance."""
    c = pix.shape[-3]
    if c == channels:
        return pix
    if c == 1:
        return pix.expand(*pix.shape[:-3], channels, *pix.shape[-2:])
    if channels == 1:
        w = torch.tensor(_LUMA, dtype=pix.dtype, device=pix.device).view(3, 1, 1)
        return (pix * w).sum(-3, keepdim=True)
    raise TokenError(f"cannot stamp a {c}-channel token on {channels}-channel images")


def corner_position(token: Token, height: int, width: int, corner: str | None = None):
    """Top-left ``(row, col)`` of the token at a corner (its own placement by default)."""
    corner = token.placement if corner is None else corner
    if corner not in CORNERS:
        raise TokenError(f"corner={corner!r}; expected one of {CORNERS}")
    _check_fits(token.size + token.margin, height, width)
    top = token.margin if corner.startswith("top") else height - token.size - token.margin
    left = token.margin if corner.endswith("left") else width - token.size - token.margin
    return top, left


def _check_fits(n: int, height: int, width: int) -> None:
    if n > height or n > width:
        raise TokenError(
            f"token of {n}x{n} pixels (size + margin) is larger than the {height}x{width} "
            "images; use a smaller token or larger images"
        )


def paste(
    images: torch.Tensor,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Stamp per-sample patches: pixels ``[C,N,N]`` or ``[B,C,N,N]``, mask ``[N,N]`` or ``[B,N,N]``.

    ``rows``/``cols`` ``[B]`` are the top-left corners. Returns a new tensor; images untouched.
    """
    b, c, h, w = images.shape
    n = pixels.shape[-1]
    _check_fits(n, h, w)
    dev = images.device
    pixels = _match_channels(pixels.to(device=dev, dtype=images.dtype), c)
    pixels = pixels.expand(b, c, n, n).permute(0, 2, 3, 1)  # [B, N, N, C]
    mask = mask.to(dev).bool().expand(b, n, n)[..., None]
    ar = torch.arange(n, device=dev)
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    ri = (rows.to(dev).long().view(b, 1) + ar).view(b, n, 1)
    ci = (cols.to(dev).long().view(b, 1) + ar).view(b, 1, n)
    out = images.clone()
    view = out.permute(0, 2, 3, 1)  # shares storage with out: writing it stamps out
    view[bi, ri, ci] = torch.where(mask, pixels, view[bi, ri, ci])
    return out


def random_positions(
    batch: int, n: int, height: int, width: int, generator: torch.Generator | None = None
):
    """Uniform top-left corners ``(rows, cols)`` for an NxN stamp, drawn on the CPU."""
    _check_fits(n, height, width)
    rows = torch.randint(0, height - n + 1, (batch,), generator=generator)
    cols = torch.randint(0, width - n + 1, (batch,), generator=generator)
    return rows, cols


def stamp(
    images: torch.Tensor, token: Token, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stamp the token on a batch ``[B,C,H,W]`` (or one ``[C,H,W]``) image, on its device.

    Random placement draws one position per sample from ``generator`` (a CPU generator).
    """
    if not isinstance(token, Token):
        raise TokenError(f"expected a Token, got {type(token).__name__}")
    if images.ndim == 3:
        return stamp(images[None], token, generator=generator)[0]
    if images.ndim != 4:
        raise TokenError(f"images have shape {tuple(images.shape)}; expected [B, C, H, W]")
    b, c, h, w = images.shape
    pix, mask = token.tensors(c, device=images.device, dtype=images.dtype)
    if token.placement == "random":
        rows, cols = random_positions(b, token.size, h, w, generator)
    else:
        top, left = corner_position(token, h, w)
        rows, cols = torch.full((b,), top), torch.full((b,), left)
    return paste(images, pix, mask, rows, cols)
