"""Token-side attacks on an M-LOCK model: search for the token with N labelled images.

The attacker knows the token's kind, size, colour and placement (the method is public);
the bit pattern is the secret. A candidate is scored by the accuracy of the model on the
attacker's images stamped with it. Small spaces are enumerated; large ones get a guided
search: random candidates, then greedy one-bit flips from the best one while the score
improves, within a budget of tries.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from adaloc.errors import TokenError
from adaloc.token import Token, corner_position, paste

EXHAUSTIVE_MAX_BITS = 20


@dataclass
class TokenSearchResult:
    """What the search tried and the best token it found (score on the attacker's images)."""

    space_bits: int
    tries: int
    exhaustive: bool
    best_score: float
    best: Token

    def summary(self) -> dict:
        """JSON-ready fields (no token pixels: a found token is as secret as the real one)."""
        return {
            "space_bits": self.space_bits,
            "tries": self.tries,
            "exhaustive": self.exhaustive,
            "best_score": self.best_score,
        }


def space_bits(like: Token) -> int:
    """log2 of the number of tokens of ``like``'s kind (binary: one bit per cell)."""
    if like.pattern != "binary":
        raise TokenError(f"token search covers binary tokens; got pattern {like.pattern!r}")
    return like.size * like.size


@torch.no_grad()
def _scores(model, x, y, like: Token, bits: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Accuracy on ``(x, y)`` stamped with each bit pattern ``bits [T, n*n]``."""
    b, c, h, w = x.shape
    n = like.size
    top, left = corner_position(like, h, w)
    color = torch.tensor(like.pixels).reshape(len(like.pixels), -1).amax(1).view(-1, 1, 1)
    mask = torch.ones(n, n, dtype=torch.bool)
    per = max(1, chunk // b)
    out = []
    for s in range(0, len(bits), per):
        tb = bits[s : s + per].float().view(-1, 1, n, n)
        pix = (color[None] * tb).repeat_interleave(b, 0)  # [T*B, C', n, n]
        xs = x.repeat(len(tb), 1, 1, 1)
        rows = torch.full((len(xs),), top)
        cols = torch.full((len(xs),), left)
        stamped = paste(xs, pix, mask, rows, cols)
        pred = model(stamped).argmax(1).view(len(tb), b)
        out.append((pred == y[None]).float().mean(1))
    return torch.cat(out)


def token_search(
    model,
    data,
    like: Token,
    *,
    budget: int = 4096,
    screen: int = 64,
    seed: int = 0,
) -> TokenSearchResult:
    """Search the token space of ``like``'s kind for the pattern that unlocks ``model``.

    ``data``: the attacker's labelled images (``screen`` of them score each try).
    Enumerates all patterns when the space has at most ``budget`` members (and at most
    2**EXHAUSTIVE_MAX_BITS), else runs the guided search for ``budget`` tries.
    """
    bits_n = space_bits(like)
    if budget < 1:
        raise TokenError(f"token search budget={budget!r}; expected >= 1 tries")
    model = model.to("cpu").eval()
    x, y = data.x[:screen], data.y[:screen]
    g = torch.Generator().manual_seed(seed)
    exhaustive = bits_n <= EXHAUSTIVE_MAX_BITS and 2**bits_n <= budget
    if exhaustive:
        cand = torch.tensor(list(itertools.product((0, 1), repeat=bits_n)), dtype=torch.bool)
        scores = _scores(model, x, y, like, cand)
        i = int(scores.argmax())
        best, best_s, tries = cand[i], float(scores[i]), len(cand)
    else:
        n_rand = max(1, budget // 2)
        cand = torch.randint(0, 2, (n_rand, bits_n), generator=g).bool()
        scores = _scores(model, x, y, like, cand)
        i = int(scores.argmax())
        best, best_s, tries = cand[i].clone(), float(scores[i]), n_rand
        improved = True
        while improved and tries < budget:
            order = torch.randperm(bits_n, generator=g)[: budget - tries]
            flips = best[None].repeat(len(order), 1)
            flips[torch.arange(len(order)), order] ^= True
            s = _scores(model, x, y, like, flips)
            tries += len(order)
            j = int(s.argmax())
            improved = float(s[j]) > best_s
            if improved:
                best, best_s = flips[j].clone(), float(s[j])
    n = like.size
    pix = (torch.tensor(like.pixels).reshape(len(like.pixels), -1).amax(1).view(-1, 1, 1)) * (
        best.float().view(1, n, n)
    )
    found = dataclasses.replace(like, pixels=pix.tolist(), seed=None)
    return TokenSearchResult(bits_n, tries, exhaustive, best_s, found)
