"""Which per-row signal gives the key positions away? Detector feature ablation.

    python bench/positions_signal.py --dataset digits --model mlp
    python bench/positions_signal.py --dataset digits --model mlp --selections default \
        --match-fanout both

Trains the owner (as bench/attacks.py does) and an attacker's shadow model, locks both with
each selection rule and fill, and scores the shadow-trained position detector with all
features, with the subset the attacker picks on its own shadows (``cv``: leave one shadow
out, the bench's attacker), each feature alone, and each feature left out (recall vs the
key's share).
Selection ``default`` is the library's lock for the model (``default_spec`` and its
hardening, which the attacker applies to its shadows too, as in bench/attacks.py), except
that ``hide_fanout`` is this script's own axis (``--hide-fanout``, off unless asked; the
library's norm-free default has it on since stop 29) and the fill is ``--fills``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json

import torch

from adaloc.attacks import attacker_split, fresh_fn, infer_positions, position_report
from adaloc.attacks import positions as P
from adaloc.attacks.weights import refill
from adaloc.data import load_dataset, make_stages
from adaloc.harden import default_hardening, hide_fanout, nontransferable
from adaloc.keys import KeyMask, KeySpec, _forced_names, default_spec, rows_view, select_key
from adaloc.lock import DONOR_FILLS, decoy_donor, lock
from adaloc.models import build_model
from adaloc.training import TrainConfig, fit

FEATURES = P.FEATURES


def _locked(model, spec, fill, data, seed, harden=None, make_donor=None):
    """(locked base, true mask) of ``model`` under ``spec``, hardened first if asked; the
    "decoy" fill's donor is ``make_donor()``, hardened with as many rows keyed elsewhere."""
    mask = select_key(model, spec, data=data)
    if harden is not None:
        model = harden(model, mask, data)
    donor = None
    if fill in DONOR_FILLS:
        donor = decoy_donor(make_donor(), mask, model, data, harden, seed=seed)
    return lock(model, mask, fill=fill, seed=seed, donor=donor)[0], mask


def _trained(make, seed, data, epochs):
    """A fresh network trained as the script trains its owner / shadows (a decoy donor)."""
    net = fresh_fn(make, seed)()
    fit(net, data, TrainConfig(epochs=epochs, lr=0.05, device="cpu"), progress=False)
    return net


def _recall(owner_lock, spec, pairs, keep):
    """Recall of the detector fitted on the shadow ``pairs`` with the features in ``keep``."""
    base, mask = owner_lock
    orig = P.row_features

    def masked(*a, **kw):  # a dropped feature is constant 0: the detector cannot use it
        return orig(*a, **kw) * keep

    P.row_features = masked
    try:
        det = P.fit_detector(pairs, spec)
        rep = position_report(base, spec, infer_positions(base, spec, det), mask)
    finally:
        P.row_features = orig
    return round(100 * rep.recall, 1), round(100 * rep.share, 1)


def _harden(model, mask, train, *, cfg, hide, make):
    if cfg is not None:
        model = nontransferable(model, mask, train, fresh_fn(make, 99), cfg)
    return hide_fanout(model, mask) if hide else model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="data")
    p.add_argument("--model", default="mlp")
    p.add_argument("--n", type=int, default=72)
    p.add_argument("--selections", default="magnitude,random")
    p.add_argument("--fills", default="matched")
    p.add_argument("--match-fanout", choices=("no", "yes", "both"), default="no",
                   help="KeySpec.match_fanout of the locks measured")  # fmt: skip
    p.add_argument("--hide-fanout", choices=("no", "yes", "both"), default="no",
                   help="adaloc.harden.hide_fanout after the lock's hardening")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="owner, data split and draw seed")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="only the detector with all features")  # fmt: skip
    a = p.parse_args()
    torch.set_num_threads(1)
    bundle = load_dataset(a.dataset, a.data_root)
    st = make_stages(bundle, updates=1, seed=a.seed, val_fraction=0.0)
    make = functools.partial(
        build_model,
        a.model,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )
    epochs = 2 if len(st[0].train) >= 20_000 else 20
    torch.manual_seed(a.seed)
    owner = make()
    fit(owner, st[0].train, TrainConfig(epochs=epochs, lr=0.05, device="cpu"), progress=False)
    data = attacker_split(st[1].train, a.n, seed=a.seed + 1)
    shadow = fresh_fn(make, 7)()
    fit(shadow, data.train, TrainConfig(epochs=40, lr=0.05, device="cpu"), progress=False)
    out = {}
    matches = {"no": (False,), "yes": (True,), "both": (False, True)}[a.match_fanout]
    hides = {"no": (False,), "yes": (True,), "both": (False, True)}[a.hide_fanout]
    grid = itertools.product(a.selections.split(","), a.fills.split(","), matches, hides)
    for sel, fill, match, hide in grid:
        cfg = None
        if sel == "default":
            spec = dataclasses.replace(default_spec(make()), match_fanout=match)
            cfg = default_hardening(make())
        else:
            spec = KeySpec(selection=sel, match_fanout=match)
        harden = None
        if cfg is not None or hide:
            harden = functools.partial(_harden, cfg=cfg, hide=hide, make=make)
        owner_donor = functools.partial(_trained, make, 55, st[0].train, epochs)
        owner_lock = _locked(owner, spec, fill, st[0].train, 0, harden, owner_donor)
        # the attacker's second shadow: the stolen base, card tensors refilled
        state = owner_lock[0].state_dict()
        forced = KeyMask(
            {
                n: torch.arange(rows_view(state[n], "row").shape[0])
                for n in _forced_names(owner, spec)
            }
        )
        shadows = [shadow, refill(owner_lock[0], forced, fresh_fn(make, 11)())]
        # the attacker locks its shadows with the public recipe, on its own images
        # (a decoy fill's donors: networks it trains on its own images, as its first shadow)
        pairs = [
            _locked(m, spec, fill, data.train, 1 + k, harden,
                    functools.partial(_trained, make, 70 + k, data.train, 40))
            for k, m in enumerate(shadows)
        ]  # fmt: skip
        n_f = P.N_FEATURES
        res = {"all": _recall(owner_lock, spec, pairs, torch.ones(n_f))}
        keep = P.select_features(pairs, spec)
        res["cv"] = _recall(owner_lock, spec, pairs, keep)[0]
        res["cv_features"] = [f for f, k in zip(FEATURES, keep.tolist(), strict=True) if k]
        for i, f in enumerate(FEATURES if a.ablation else ()):
            only = torch.zeros(n_f)
            only[i] = 1
            res[f"only_{f}"] = _recall(owner_lock, spec, pairs, only)[0]
            res[f"drop_{f}"] = _recall(owner_lock, spec, pairs, 1 - only)[0]
        name = f"{sel}/{fill}" + ("/match_fanout" if match else "") + ("/hide" if hide else "")
        out[name] = res
        print(name, json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
