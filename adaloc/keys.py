"""Key specs, key masks and key selection (which weights form the secret access key).

A key is a set of *positions* in the network's tensors. With ``granularity="row"`` a position
is a row (dim 0: a conv filter, a linear output neuron, one element of a bias or norm scale);
with ``"element"`` it is a single value. The budget is a fraction of the model's
*parameters* (not rows: a row fraction hides far more parameters when wide rows win).
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from adaloc.errors import ConfigError

SELECTIONS = ("magnitude", "bottom", "random", "saliency", "adaptability", "first")
# Views of the owner's data that "adaptability" saliency measures gradients under: corruption
# kinds that the lifecycle bench does NOT use as its update shifts (invert/rotate/contrast),
# so the rule is not tuned to the shifts it is scored on.
ADAPTABILITY_VIEWS = ("clean", "blur", "noise", "translate")
GRANULARITIES = ("row", "element")
BN_STATS_MODES = ("key", "freeze")
KEYSPEC_FORMAT_VERSION = 1
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class KeySpec:
    """How a key is chosen.

    budget: fraction of the model's parameters that form the key, in (0, 1).
    selection: "magnitude" (paper: top rows by L1 norm), "bottom", "random", "saliency"
        (data-aware: first-order Taylor importance |grad * w| per parameter on owner data) or
        "adaptability" (the same importance summed over shifted views of the owner data:
        the weights a shift would need to move, see ADAPTABILITY_VIEWS) or "first" (rows of
        the earliest weight tensors first, by magnitude within a tensor: the layers whose
        features transfer best go into the key before any later one).
    granularity: "row" (filters / neurons) or "element" (single weights).
    seed: makes "random" selection and any sampling deterministic.
    include_norm: put every normalization-layer scale/shift in the key.
    include_head: put the whole classifier head in the key.
    bn_stats: "key" lets BatchNorm running statistics adapt as part of the key;
        "freeze" keeps them fixed (BatchNorm runs in eval mode during key-only updates).
    include_stem: put the whole input stem (the first convolution, with its bias) in the
        key: it sees every input statistic, so an update can undo an input shift there.
    match_fanout: within each weight tensor, take the rows spread evenly over the rank
        order of their *fan-out* (the norm of what the unit feeds into the next weight
        tensor, which stays public), the best-scored row of each stratum, instead of the
        best-scored rows overall. A data-aware selection takes units with large outgoing
        weights, so the fan-out tells an attacker where the key is; matched, the keyed
        units' fan-outs are a sample of the tensor's own (bench/README.md "Attacks").
    """

    budget: float = 0.05
    selection: str = "magnitude"
    granularity: str = "row"
    seed: int = 0
    include_norm: bool = True
    include_head: bool = True
    bn_stats: str = "key"
    include_stem: bool = True
    match_fanout: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.budget, (int, float)) or not 0.0 < float(self.budget) < 1.0:
            raise ConfigError(
                f"key budget should be a fraction of parameters in (0, 1), got {self.budget!r}"
            )
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection {self.selection!r} is unknown; use one of {SELECTIONS}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity {self.granularity!r} is unknown; use one of {GRANULARITIES}"
            )
        if self.bn_stats not in BN_STATS_MODES:
            raise ConfigError(f"bn_stats {self.bn_stats!r} is unknown; use one of {BN_STATS_MODES}")

    def to_dict(self) -> dict:
        """Plain dict with the format version, for JSON."""
        return {"format_version": KEYSPEC_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> KeySpec:
        """Build from a dict; unknown keys (from newer versions) warn, bad values fail."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known - {"format_version"}
        if extra:
            warnings.warn(f"ignoring unknown KeySpec fields {sorted(extra)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        """JSON text of the spec."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KeySpec:
        """Parse JSON text written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"KeySpec JSON is malformed: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"KeySpec JSON should be an object, got {type(data).__name__}")
        return cls.from_dict(data)


def has_norm_layers(model: nn.Module) -> bool:
    """True when ``model`` has a normalization layer (BatchNorm, LayerNorm, GroupNorm)."""
    return any(isinstance(m, _NORM_TYPES) for m in model.modules())


def default_rule(norm_free: bool) -> dict:
    """The selection rule of :func:`default_spec`: the one rule the library, the flows
    (``pipelines.config.PipelineConfig.key_spec``) and bench/attacks.py's ``default`` use.

    With norm layers: data-aware ``saliency`` rows besides every norm layer, the head and
    the stem (the norm layers in the key cut the network after each of them; bench/README.md
    "Attacks"). Without (an MLP): ``first``, the earliest layer's rows, which the default
    hardening (:func:`adaloc.harden.default_hardening`) makes the only carrier of the
    features."""
    return {"selection": "first" if norm_free else "saliency"}


def default_spec(model: nn.Module, **overrides) -> KeySpec:
    """The library's key spec for ``model``: :func:`default_rule` under ``KeySpec()``'s
    budget, granularity and forced tensors (``overrides`` win). Saliency needs the owner's
    data: ``select_key(model, spec, data=...)``."""
    return KeySpec(**{**default_rule(not has_norm_layers(model)), **overrides})


@functools.cache
def norm_free(name: str) -> bool:
    """True when the model builder ``name`` (``adaloc.models``) makes a network without norm
    layers, the case :func:`default_spec` and the default hardening treat apart (the MLP)."""
    from adaloc.models import build_model

    with torch.device("meta"):  # layers only: no memory, no init (densenet121: ~0.1 s)
        return not has_norm_layers(build_model(name, in_channels=1, num_classes=2, image_size=32))


def rows_view(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """2-D view of a tensor whose first axis enumerates the key positions."""
    if granularity == "element" or t.dim() <= 1:
        return t.reshape(-1, 1)
    return t.reshape(t.shape[0], -1)


@dataclass
class KeyMask:
    """Key positions: per tensor name, sorted unique row (or element) indices."""

    indices: dict[str, torch.Tensor]
    granularity: str = "row"

    @property
    def names(self) -> list[str]:
        """Names of the tensors that hold key positions, sorted."""
        return sorted(self.indices)

    def positions(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Boolean tensor shaped like ``tensor``: True at key positions."""
        rows = rows_view(tensor, self.granularity)
        sel = torch.zeros(rows.shape[0], dtype=torch.bool, device=tensor.device)
        if name in self.indices:
            sel[self.indices[name].to(tensor.device)] = True
        return sel[:, None].expand_as(rows).reshape(tensor.shape)

    def count(self, state: dict[str, torch.Tensor]) -> dict[str, int]:
        """Number of key values per tensor of ``state``."""
        out = {}
        for name, idx in self.indices.items():
            out[name] = int(idx.numel()) * rows_view(state[name], self.granularity).shape[1]
        return out

    def params_in_key(self, model: nn.Module) -> int:
        """How many *parameters* (not buffers) lie in the key."""
        params = dict(model.named_parameters())
        return sum(n for name, n in self.count(model.state_dict()).items() if name in params)


def head_module_name(model: nn.Module) -> str:
    """Name of the classifier head: the last ``nn.Linear`` in module order."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear head; set include_head=False")
    return last


def stem_module_name(model: nn.Module) -> str | None:
    """Name of the input stem: the first ``nn.Conv2d`` in module order (None without one)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    return None


def _forced_names(model: nn.Module, spec: KeySpec) -> list[str]:
    """Tensors that go into the key whole (norm layers, head, stem, BatchNorm statistics)."""
    names: list[str] = []
    head = head_module_name(model) if spec.include_head else None
    stem = stem_module_name(model) if spec.include_stem else None
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        whole = (spec.include_norm and isinstance(module, _NORM_TYPES)) or mname in (head, stem)
        if whole:
            names += [prefix + p for p, _ in module.named_parameters(recurse=False)]
        bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if spec.bn_stats == "key" and bn and module.track_running_stats:
            names += [prefix + "running_mean", prefix + "running_var"]
    return names


def _view(x: torch.Tensor, view: str, seed: int) -> torch.Tensor:
    if view == "clean":
        return x
    if view == "translate":
        # a shift by ~1/8 of the side: geometric, unlike the photometric views
        dy, dx = max(1, x.shape[-2] // 8), max(1, x.shape[-1] // 8)
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    from adaloc.shifts import apply_shift

    return apply_shift(x, view, seed=seed)


def _saliency(
    model: nn.Module,
    data,
    views: tuple[str, ...] = ("clean",),
    n_batches: int = 8,
    batch_size: int = 128,
) -> dict:
    """|grad * w| accumulated over a few owner batches and ``views`` (Taylor importance)."""
    if data is None:
        raise ConfigError("saliency-based selection needs owner data: pass data=<ImageSet>")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.y), generator=g)[: n_batches * batch_size]
    for k, view in enumerate(views):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = _view(data.x[idx], view, seed=k * 100003 + start).to(device)
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), data.y[idx].to(device)).backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    grads[n] += (p.grad * p.detach()).abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grads


def fanout(params: dict, name: str) -> torch.Tensor | None:
    """Per row of weight tensor ``name``: the norm of its unit's outgoing weights in the next
    weight tensor (in ``params`` order) whose input width is a multiple of its row count,
    as an observer of the public weights reads it; None when no such tensor follows."""
    names = [n for n, p in params.items() if p.dim() >= 2]
    c = params[name].shape[0]
    for nxt in names[names.index(name) + 1 :]:
        v = params[nxt].detach()
        if v.shape[1] % c == 0:
            return v.float().reshape(v.shape[0], c, -1).pow(2).sum((0, 2)).sqrt().cpu()
    return None


def _fanout_strata(params: dict, cand: list[str], k: int, score: torch.Tensor, n: int):
    """``n`` rows of ``cand[k]``: its rows sorted by fan-out, cut into ``n`` equal strata,
    the best-scored row of each (the top ``n`` by score when no fan-out is defined)."""
    f = fanout(params, cand[k])
    if f is None:
        return torch.sort(torch.argsort(score, descending=True)[:n]).values
    strata = torch.tensor_split(torch.argsort(f), n)
    return torch.sort(torch.stack([s[torch.argmax(score[s])] for s in strata])).values


def select_key(model: nn.Module, spec: KeySpec, *, data=None) -> KeyMask:
    """Choose the key positions of ``model`` under ``spec`` (deterministic for a seed).

    Forced tensors (norm layers, head, BatchNorm statistics) go in whole; the rest of the
    parameter budget is filled with the best rows (or elements) of the weight tensors by the
    selection rule, each ranked by score per parameter so wide rows do not crowd out the rest.
    """
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    budget = int(spec.budget * total)
    forced = _forced_names(model, spec)
    state = model.state_dict()
    gran = spec.granularity
    indices = {n: torch.arange(rows_view(state[n], gran).shape[0]) for n in forced}
    used = sum(state[n].numel() for n in forced if n in params)
    if used > budget:
        raise ConfigError(
            f"key budget {spec.budget} ({budget} parameters) is smaller than the forced part "
            f"({used} parameters: norm layers/head); raise the budget or set "
            "include_norm/include_head to False"
        )
    # Candidate units: rows/elements of weight matrices and conv filters; a row carries its
    # bias element with it, so a keyed neuron is wholly secret.
    views = {"saliency": ("clean",), "adaptability": ADAPTABILITY_VIEWS}.get(spec.selection)
    sal = _saliency(model, data, views) if views else None
    cand = [n for n, p in params.items() if p.dim() >= 2 and n not in indices]
    biases, scores, costs, owner, row_of = [], [], [], [], []
    for k, n in enumerate(cand):
        rows = rows_view(params[n].detach(), gran)
        bias = n[: -len("weight")] + "bias" if n.endswith("weight") else None
        has_bias = gran == "row" and bias in params and bias not in indices
        biases.append(bias if has_bias else None)
        cost = torch.full((rows.shape[0],), float(rows.shape[1] + int(has_bias)))
        if spec.selection in ("magnitude", "bottom"):
            s = rows.abs().sum(1).float().cpu()
        elif spec.selection == "first":
            # earlier tensors outrank later ones; magnitude (in [0, 1)) orders within one
            mag = rows.abs().sum(1).float().cpu()
            s = (len(cand) - k) + 0.5 * mag / mag.max().clamp_min(1e-12)
        elif sal is not None:
            s = rows_view(sal[n], gran).sum(1).float().cpu() / cost
        else:
            s = torch.zeros(rows.shape[0])
        scores.append(s)
        costs.append(cost)
        owner.append(torch.full((rows.shape[0],), k, dtype=torch.int64))
        row_of.append(torch.arange(rows.shape[0]))
    if not scores:
        return KeyMask(indices, gran)
    score, cost = torch.cat(scores), torch.cat(costs)
    owner_t, row_t = torch.cat(owner), torch.cat(row_of)
    g = torch.Generator().manual_seed(spec.seed)
    if spec.selection == "random":
        order = torch.randperm(len(score), generator=g)
    else:
        # a tiny seeded jitter breaks ties deterministically without changing real ranks
        jitter = torch.rand(len(score), generator=g) * 1e-12
        order = torch.argsort(score + jitter, descending=spec.selection != "bottom")
    # greedy by rank: take the longest prefix of the ranking that fits the budget
    take = order[torch.cumsum(cost[order].double(), 0) <= budget - used]
    for k, name in enumerate(cand):
        rows = torch.sort(row_t[take[owner_t[take] == k]]).values
        if spec.match_fanout and gran == "row" and rows.numel():
            rows = _fanout_strata(params, cand, k, scores[k], rows.numel())
        if rows.numel():
            indices[name] = rows
            if biases[k] is not None:
                indices[biases[k]] = rows.clone()
    return KeyMask(indices, gran)
