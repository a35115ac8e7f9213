"""Key position inference: which rows of a published base hold the (filled) key?

The attacker has the base and its model card (which names the key spec: budget, selection
rule, whether norm layers and the head are keyed whole), never the mask. Tensors keyed
whole are public knowledge through the card; the secret part is *which rows* of the other
weight tensors were taken. Those are found with a shadow-model detector: the attacker
trains a network of the same architecture on its own images, locks it with the public
recipe (same spec, same fill: Kerckhoffs), and fits a logistic regression that tells filled
rows from real ones on per-row statistics (norm, kurtosis, constancy, fan-out into the
next layer, kernel smoothness, nearest-neighbour similarity). The rows of the base it finds
most suspicious, up to the card's budget, are the inferred key.

Which statistics the detector uses is the attacker's choice too, made on its own shadows:
with ``features="cv"`` it keeps the subset (greedy forward selection) whose detector finds
the most key rows on a shadow lock it was not fitted on (leave one shadow out), since a
hardened lock can make some statistics misleading (bench/README.md "Attacks").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adaloc.keys import KeyMask, KeySpec, _forced_names, rows_view

FEATURES = ("const", "norm", "kurt", "fanout", "smooth", "mean", "cos", "dist")
N_FEATURES = len(FEATURES)


@dataclass
class PositionReport:
    """Inferred key positions scored against the true mask, counted in parameters.

    Over the *candidate* part only (rows of weight tensors not keyed whole, which the
    card discloses anyway). ``share`` is the key's share of the candidate parameters: the
    precision and recall of a blind guess of the same size.
    """

    precision: float
    recall: float
    share: float
    inferred_params: int
    key_params: int

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return dict(self.__dict__)


def _candidates(model: nn.Module, spec: KeySpec) -> tuple[list[str], dict[str, str | None]]:
    """Weight tensors whose rows the key may take (not forced), and each one's bias."""
    forced = set(_forced_names(model, spec))
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dim() >= 2 and n not in forced]
    bias = {}
    for n in names:
        b = n[: -len("weight")] + "bias" if n.endswith("weight") else None
        bias[n] = b if spec.granularity == "row" and b in params and b not in forced else None
    return names, bias


def _z(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean()) / v.std().clamp_min(1e-12) if v.numel() > 1 else torch.zeros_like(v)


def _fanout(state: dict, names: list[str], i: int) -> torch.Tensor | None:
    """Norm of what each row of tensor ``i`` feeds into the next weight tensor, if found."""
    w = state[names[i]]
    c = w.shape[0]
    for nxt in names[i + 1 :]:
        v = state[nxt]
        if v.dim() >= 2 and v.shape[1] % c == 0 and v.shape[1] >= c:
            return v.float().reshape(v.shape[0], c, -1).pow(2).sum((0, 2)).sqrt()
    return None


@torch.no_grad()
def row_features(state: dict, names: list[str], granularity: str = "row") -> torch.Tensor:
    """Per-row statistics ``[rows, N_FEATURES]`` of the candidate tensors, in ``names`` order."""
    feats = []
    weights = [n for n in state if state[n].dim() >= 2]
    for name in names:
        t = state[name].float()
        rows = rows_view(t, granularity)
        norm = rows.norm(dim=1)
        std = rows.std(1) if rows.shape[1] > 1 else rows.abs().squeeze(1)
        const = (std < 1e-12).float()
        cen = rows - rows.mean(1, keepdim=True)
        kurt = (cen.pow(4).mean(1) / cen.pow(2).mean(1).pow(2).clamp_min(1e-24)).clamp(0, 50)
        fan = _fanout(state, weights, weights.index(name)) if granularity == "row" else None
        fan = _z(fan.clamp_min(1e-12).log()) if fan is not None else torch.zeros(len(rows))
        smooth = torch.zeros(len(rows))
        if t.dim() == 4 and t.shape[-1] > 1 and granularity == "row":
            diff = (t[..., 1:] - t[..., :-1]).pow(2).flatten(1).sum(1)
            smooth = _z(diff / t.pow(2).flatten(1).sum(1).clamp_min(1e-24))
        if rows.shape[1] > 1 and len(rows) > 1:
            unit = cen / cen.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cos = (unit @ unit.T).abs().fill_diagonal_(0).amax(1)
            prof = rows.abs().sort(1).values / norm[:, None].clamp_min(1e-12)
            dist = torch.cdist(prof, prof).fill_diagonal_(float("inf")).amin(1)
            dist = torch.where(torch.isfinite(dist), dist, torch.zeros_like(dist))
        else:
            cos = dist = torch.zeros(len(rows))
        mean = rows.mean(1) / t.std().clamp_min(1e-12)
        f = [const, _z(norm.clamp_min(1e-12).log()), _z(kurt), fan, smooth, mean, _z(cos)]
        f.append(_z(dist))
        feats.append(torch.stack(f, 1))
    return torch.cat(feats) if feats else torch.zeros(0, N_FEATURES)


def _labels(state: dict, names: list[str], mask: KeyMask) -> torch.Tensor:
    out = []
    for n in names:
        sel = torch.zeros(rows_view(state[n], mask.granularity).shape[0])
        if n in mask.indices:
            sel[mask.indices[n]] = 1.0
        out.append(sel)
    return torch.cat(out)


def _fit(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, steps: int):
    """Balanced, lightly regularised logistic regression on the standardized features in
    ``keep`` (a 0/1 vector); dropped features get weight 0."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std * keep
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos = float(y.mean().clamp(1e-3, 1 - 1e-3))
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = xs @ w + b
        loss = (
            nn.functional.binary_cross_entropy_with_logits(logit, y, weight=weight)
            + 1e-3 * w.pow(2).sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w * keep).detach(), b.detach(), mean, std


def _pair_rows(pairs, spec: KeySpec) -> list:
    out = []
    for shadow_base, shadow_mask in pairs:
        names, _ = _candidates(shadow_base, spec)
        state = shadow_base.state_dict()
        x = row_features(state, names, spec.granularity)
        out.append((x, _labels(state, names, shadow_mask), shadow_base, shadow_mask))
    return out


def _auc(score: torch.Tensor, y: torch.Tensor) -> float:
    pos, neg = score[y > 0], score[y <= 0]
    if not len(pos) or not len(neg):
        return 0.5
    return float((pos[:, None] > neg[None, :]).float().mean())


def _cv_score(rows: list, spec: KeySpec, keep: torch.Tensor, steps: int) -> tuple:
    """(recall at the budget, AUC) on each shadow of a detector fitted on the others."""
    recall = auc = 0.0
    for i, (x, y, base, mask) in enumerate(rows):
        others = [r for j, r in enumerate(rows) if j != i]
        det = _fit(torch.cat([r[0] for r in others]), torch.cat([r[1] for r in others]),
                   keep, steps)  # fmt: skip
        score = _score(x, det)
        recall += position_report(base, spec, _take(base, spec, score), mask).recall
        auc += _auc(score, y)
    return recall / len(rows), auc / len(rows)


def select_features(pairs, spec: KeySpec, steps: int = 200) -> torch.Tensor:
    """The attacker's feature subset (0/1 over :data:`FEATURES`), chosen on its shadows.

    Greedy forward selection, scored by leave-one-shadow-out recall at the card's budget
    (AUC breaks ties, then the smaller subset); all features kept if that scores higher, or
    with fewer than two shadows (nothing to validate on).
    """
    return _select(_pair_rows(pairs, spec), spec, steps)


def _select(rows: list, spec: KeySpec, steps: int) -> torch.Tensor:
    every = torch.ones(N_FEATURES)
    if len(rows) < 2:
        return every
    best, best_score = every, _cv_score(rows, spec, every, steps)
    keep, keep_score = torch.zeros(N_FEATURES), (-1.0, -1.0)
    while keep.sum() < N_FEATURES:
        trials = []
        for i in (keep == 0).nonzero().view(-1).tolist():
            k = keep.clone()
            k[i] = 1
            trials.append((_cv_score(rows, spec, k, steps), k))
        score, k = max(trials, key=lambda t: t[0])
        if score <= keep_score:
            break
        keep, keep_score = k, score
        if score >= best_score:  # a tie goes to the smaller subset
            best, best_score = k, score
    return best


def fit_detector(pairs, spec: KeySpec, steps: int = 200, features=None):
    """Logistic regression that tells filled rows from real ones on shadow locks.

    ``pairs``: ``(locked base, its true mask)`` pairs the attacker made itself.
    ``features``: None (all of :data:`FEATURES`), ``"cv"`` (:func:`select_features`) or a
    0/1 tensor over them. Returns ``(weights, bias, mean, std)`` of the detector over
    standardized features; a dropped feature's weight is 0.
    """
    if isinstance(features, str) and features != "cv":
        raise ValueError(f"features must be None, 'cv' or a 0/1 tensor, got {features!r}")
    rows = _pair_rows(pairs, spec)  # the row statistics once, for the choice and the fit
    if isinstance(features, str):
        features = _select(rows, spec, steps)
    keep = torch.ones(N_FEATURES) if features is None else features.float()
    return _fit(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), keep, steps)


def _score(x: torch.Tensor, detector) -> torch.Tensor:
    if detector is None:
        return x[:, 0]
    w, b, mean, std = detector
    return ((x - mean) / std) @ w + b


def infer_positions(base: nn.Module, spec: KeySpec, detector=None) -> KeyMask:
    """The attacker's guess of the key mask of ``base`` from the base and the card's spec.

    Tensors the spec keys whole are taken whole; then candidate rows are ranked by the
    detector's score (by constancy alone without one: the paper's zero fill), and the
    most suspicious are taken, by score per parameter, up to the card's budget.
    """
    names, _ = _candidates(base, spec)
    x = row_features(base.state_dict(), names, spec.granularity)
    return _take(base, spec, _score(x, detector))


def _take(base: nn.Module, spec: KeySpec, score: torch.Tensor) -> KeyMask:
    """The card-forced tensors, then the rows by ``score`` (per candidate row, in
    :func:`_candidates` order) up to the card's budget."""
    params = dict(base.named_parameters())
    state = base.state_dict()
    total = sum(p.numel() for p in params.values())
    forced = _forced_names(base, spec)
    indices = {n: torch.arange(rows_view(state[n], spec.granularity).shape[0]) for n in forced}
    used = sum(state[n].numel() for n in forced if n in params)
    names, bias = _candidates(base, spec)
    costs, owner, row_of = [], [], []
    for k, n in enumerate(names):
        rows = rows_view(state[n], spec.granularity)
        costs.append(torch.full((rows.shape[0],), float(rows.shape[1] + int(bias[n] is not None))))
        owner.append(torch.full((rows.shape[0],), k))
        row_of.append(torch.arange(rows.shape[0]))
    if not names:
        return KeyMask(indices, spec.granularity)
    cost, owner_t, row_t = torch.cat(costs), torch.cat(owner), torch.cat(row_of)
    g = torch.Generator().manual_seed(0)
    order = torch.argsort(score + torch.rand(len(score), generator=g) * 1e-9, descending=True)
    take = order[torch.cumsum(cost[order].double(), 0) <= int(spec.budget * total) - used]
    for k, n in enumerate(names):
        rows = torch.sort(row_t[take[owner_t[take] == k]]).values
        if rows.numel():
            indices[n] = rows
            if bias[n] is not None:
                indices[bias[n]] = rows.clone()
    return KeyMask(indices, spec.granularity)


def position_report(model: nn.Module, spec: KeySpec, inferred: KeyMask, true: KeyMask):
    """Precision/recall (in parameters) of ``inferred`` against ``true`` on the candidates."""
    names, bias = _candidates(model, spec)
    state = model.state_dict()
    hit = guess = key = total = 0
    for n in names:
        rows = rows_view(state[n], spec.granularity)
        width = rows.shape[1] + int(bias[n] is not None)
        t = torch.zeros(rows.shape[0], dtype=torch.bool)
        i = torch.zeros(rows.shape[0], dtype=torch.bool)
        if n in true.indices:
            t[true.indices[n]] = True
        if n in inferred.indices:
            i[inferred.indices[n]] = True
        hit += int((t & i).sum()) * width
        guess += int(i.sum()) * width
        key += int(t.sum()) * width
        total += rows.shape[0] * width
    return PositionReport(
        precision=hit / guess if guess else 0.0,
        recall=hit / key if key else 0.0,
        share=key / total if total else 0.0,
        inferred_params=guess,
        key_params=key,
    )
