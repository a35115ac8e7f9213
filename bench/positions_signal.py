"""Which per-row signal gives the key positions away? Detector feature ablation.

    python bench/positions_signal.py --dataset digits --model mlp

Trains the owner (as bench/attacks.py does) and an attacker's shadow model, locks both with
each selection rule and fill, and scores the shadow-trained position detector with all
features, each feature alone, and each feature left out (recall vs the key's share).
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from adaloc.attacks import attacker_split, fresh_fn, infer_positions, position_report
from adaloc.attacks import positions as P
from adaloc.attacks.weights import refill
from adaloc.data import load_dataset, make_stages
from adaloc.keys import KeyMask, KeySpec, _forced_names, rows_view, select_key
from adaloc.lock import lock
from adaloc.models import build_model
from adaloc.training import TrainConfig, fit

FEATURES = ("const", "norm", "kurt", "fanout", "smooth", "mean", "cos", "dist")


def _pairs(models, spec, fill, data):
    out = []
    for k, m in enumerate(models):
        mask = select_key(m, spec, data=data)
        out.append((lock(m, mask, fill=fill, seed=1 + k)[0], mask))
    return out


def _recall(owner, spec, fill, shadows, data, keep):
    mask = select_key(owner, spec, data=data)
    base, _ = lock(owner, mask, fill=fill, seed=0)
    w, b, mean, std = P.fit_detector(_pairs(shadows, spec, fill, data), spec)
    w = w * keep  # a dropped feature gets weight 0 (refit below when keep is partial)
    if keep.sum() < len(keep):
        orig = P.row_features

        def masked(*a, **kw):
            return orig(*a, **kw) * keep

        P.row_features = masked
        try:
            w, b, mean, std = P.fit_detector(_pairs(shadows, spec, fill, data), spec)
            rep = position_report(owner, spec, infer_positions(base, spec, (w, b, mean, std)), mask)
        finally:
            P.row_features = orig
    else:
        rep = position_report(owner, spec, infer_positions(base, spec, (w, b, mean, std)), mask)
    return round(100 * rep.recall, 1), round(100 * rep.share, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="data")
    p.add_argument("--model", default="mlp")
    p.add_argument("--n", type=int, default=72)
    p.add_argument("--selections", default="magnitude,random")
    p.add_argument("--fills", default="matched")
    a = p.parse_args()
    torch.set_num_threads(1)
    bundle = load_dataset(a.dataset, a.data_root)
    st = make_stages(bundle, updates=1, seed=0, val_fraction=0.0)
    make = functools.partial(
        build_model,
        a.model,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    epochs = 2 if len(st[0].train) >= 20_000 else 20
    torch.manual_seed(0)
    owner = make()
    fit(owner, st[0].train, TrainConfig(epochs=epochs, lr=0.05, device="cpu"), progress=False)
    data = attacker_split(st[1].train, a.n, seed=1)
    shadow = fresh_fn(make, 7)()
    fit(shadow, data.train, TrainConfig(epochs=40, lr=0.05, device="cpu"), progress=False)
    out = {}
    for sel in a.selections.split(","):
        for fill in a.fills.split(","):
            spec = KeySpec(selection=sel)
            # the attacker's second shadow: the stolen base, card tensors refilled
            mask0 = select_key(owner, spec, data=st[0].train)
            base0, _ = lock(owner, mask0, fill=fill)
            state = base0.state_dict()
            forced = KeyMask(
                {
                    n: torch.arange(rows_view(state[n], "row").shape[0])
                    for n in _forced_names(base0, spec)
                }
            )
            shadows = [shadow, refill(base0, forced, fresh_fn(make, 11)())]
            n_f = P.N_FEATURES
            res = {"all": _recall(owner, spec, fill, shadows, st[0].train, torch.ones(n_f))}
            for i, f in enumerate(FEATURES):
                only = torch.zeros(n_f)
                only[i] = 1
                res[f"only_{f}"] = _recall(owner, spec, fill, shadows, st[0].train, only)[0]
                res[f"drop_{f}"] = _recall(owner, spec, fill, shadows, st[0].train, 1 - only)[0]
            out[f"{sel}/{fill}"] = res
            print(sel, fill, json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
