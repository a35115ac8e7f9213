"""Forged and near-miss tokens: the decoys the token lock trains against and attacks try.

Split from :mod:`adaloc.token` (the token itself and stamping) because only training and
attacks need them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from adaloc.errors import TokenError
from adaloc.token import Token, _match_channels, _random_bits


def forged_tensors(
    like: Token, batch: int, channels: int, generator: torch.Generator | None = None
):
    """Per-sample forgeries of ``like`` as ``(pixels [B,C,N,N], mask [B,N,N], is_true [B])``.

    Same rules as :func:`random_tokens`, drawn in torch on the CPU for training decoys;
    ``is_true`` flags the rare draws that equal the true token (they are not forgeries).
    """
    n = like.size
    true_pix, true_mask = like.tensors(channels)
    if like.pattern in ("patch4x4-rgb", "image") or (n == 1 and like.pattern == "pixel"):
        pix = torch.rand((batch, len(like.pixels), n, n), generator=generator)
        pix = _match_channels(pix, channels)
        mask = true_mask.expand(batch, n, n)
    else:
        bits = torch.randint(0, 2, (batch, n, n), generator=generator).float()
        color = true_pix.reshape(channels, -1).max(dim=1).values.view(1, channels, 1, 1)
        pix = color * bits[:, None]
        mask = true_mask.expand(batch, n, n) if like.pattern == "binary" else bits.bool()
    same_mask = (mask == true_mask).flatten(1).all(1)
    same_pix = ((pix - true_pix) * true_mask).abs().flatten(1).amax(1) < 1e-6
    return pix, mask, same_mask & same_pix


def near_tensors(
    like: Token,
    batch: int,
    channels: int,
    generator: torch.Generator | None = None,
    *,
    max_changes: int = 3,
):
    """Near misses of ``like``: the true token with 1..``max_changes`` of its pixels changed.

    Returns ``(pixels [B,C,N,N], mask [B,N,N], is_true [B])`` like :func:`forged_tensors`.
    Binary patterns flip stamped/unstamped cells, dot layouts flip dots, colour patches and
    images get random values in the changed cells. These are the hard negatives: random
    forgeries differ from the token in about half its cells, an attacker who knows part of
    the token in a few.
    """
    if not isinstance(max_changes, int) or max_changes < 1:
        raise TokenError(f"max_changes={max_changes!r}; expected an integer >= 1")
    n = like.size
    true_pix, true_mask = like.tensors(channels)
    k = torch.randint(1, min(max_changes, n * n) + 1, (batch,), generator=generator)
    ranks = torch.rand((batch, n * n), generator=generator).argsort(1).argsort(1)
    change = (ranks < k[:, None]).view(batch, n, n)
    color = true_pix.reshape(channels, -1).max(dim=1).values.view(1, channels, 1, 1)
    if like.pattern in ("patch4x4-rgb", "image") or n == 1:
        noise = _match_channels(
            torch.rand((batch, len(like.pixels), n, n), generator=generator), channels
        )
        pix = torch.where(change[:, None], noise, true_pix.expand(batch, -1, -1, -1))
        mask = true_mask.expand(batch, n, n)
    elif like.pattern == "binary":
        bits = (true_pix.amax(0) > 0) ^ change
        pix, mask = color * bits[:, None].float(), true_mask.expand(batch, n, n)
    else:  # fixed dot layouts: move, add or drop dots
        mask = true_mask.bool() ^ change
        pix = color * mask[:, None].float()
    same_mask = (mask.bool() == true_mask.bool()).flatten(1).all(1)
    same_pix = ((pix - true_pix) * true_mask).abs().flatten(1).amax(1) < 1e-6
    return pix, mask, same_mask & same_pix


def near_tokens(like: Token, n: int, seed: int = 0, *, max_changes: int = 3) -> list[Token]:
    """``n`` near-miss tokens (see :func:`near_tensors`), none equal to ``like``."""
    if n < 0:
        raise TokenError(f"n={n!r} near tokens; expected n >= 0")
    g = torch.Generator().manual_seed(seed)
    out: list[Token] = []
    for _ in range(100):
        if len(out) >= n:
            break
        pix, mask, same = near_tensors(like, 2 * n, like.channels, g, max_changes=max_changes)
        keep = ~same & mask.flatten(1).any(1)  # a token stamps at least one pixel
        for i in keep.nonzero().view(-1).tolist()[: n - len(out)]:
            out.append(
                dataclasses.replace(
                    like, pixels=pix[i].tolist(), mask=mask[i].int().tolist(), seed=None
                )
            )
    if len(out) < n:
        raise TokenError(f"cannot draw {n} near misses of a {like.size}x{like.size} token")
    return out


def random_tokens(like: Token, n: int, seed: int = 0) -> list[Token]:
    """``n`` forged tokens of the same kind, size and placement, none equal to ``like``.

    Binary-mask patterns get random binary masks in the same colour; colour patches and
    images get random pixel values.
    """
    if n < 0:
        raise TokenError(f"n={n!r} forged tokens; expected n >= 0")
    rng = np.random.default_rng([seed, 0x70C])
    true_pix, true_mask = np.asarray(like.pixels), np.asarray(like.mask)
    color = true_pix.reshape(true_pix.shape[0], -1).max(axis=1)
    forged: list[Token] = []
    tries = 0
    while len(forged) < n:
        tries += 1
        if tries > 100 * n + 100:
            raise TokenError(
                f"cannot draw {n} distinct forgeries of a {like.size}x{like.size} token"
            )
        if like.pattern in ("patch4x4-rgb", "image"):
            pix = rng.random(true_pix.shape, dtype=np.float32)
            mask = true_mask
        elif like.pattern == "binary":
            bits = _random_bits(rng, like.size)
            pix, mask = color[:, None, None] * bits[None], true_mask
        else:  # fixed dot layouts (and the pixel): a random layout of the same size and colour
            mask = _random_bits(rng, like.size).astype(int)
            if like.size == 1:  # a 1x1 stamp has no layout: forge its colour instead
                mask, pix = true_mask, rng.random(true_pix.shape, dtype=np.float32)
            else:
                pix = color[:, None, None] * mask[None]
        if np.array_equal(mask, true_mask) and np.allclose(pix, true_pix):
            continue
        forged.append(dataclasses.replace(like, pixels=pix, mask=mask, seed=None))
    return forged
