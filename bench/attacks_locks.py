"""bench/attacks.py's locks: the name -> (key spec, fill, hardening) table and its recipe.

A ``default*`` lock starts from the library's rule for the architecture (the flows' lock):
:func:`adaloc.keys.default_spec` and :func:`adaloc.harden.default_hardening`, with its own
spec overrides and hardening steps on top.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from adaloc.attacks import fresh_fn
from adaloc.harden import (
    HardenConfig,
    balance_fanout,
    default_hardening,
    hide_fanout,
    nontransferable,
)
from adaloc.keys import KeySpec, default_spec
from adaloc.lock import default_fill, lock

DEFAULT_FILL = inspect.signature(lock).parameters["fill"].default
LIBRARY = "library"  # the fill adaloc.lock.default_fill gives the model (as the lock flow)
LOCKS = {
    # name: (KeySpec overrides, fill[, hardening steps]); "default*" follows the library:
    # default_fill(), default_spec() and default_hardening() of the model (recipe); the
    # step "no_hide" takes default_hardening's hide_fanout out
    "paper": ({"selection": "magnitude", "include_norm": False, "include_head": False}, "zeros"),
    "default": ({}, LIBRARY),
    # the norm-free default up to stop 28 (probe hardening, matched fill); = default (CNN)
    "default_matched": ({}, DEFAULT_FILL, "no_hide"),
    # its rows spread over the fan-out ranks (KeySpec.match_fanout), or each keyed unit
    # given a public unit's fan-out after hardening (hide_fanout)
    "default_fanout": ({"match_fanout": True}, DEFAULT_FILL, "no_hide"),
    "default_hidefan": ({}, DEFAULT_FILL, "hide_fanout"),
    # each keyed row filled with a public-like row of a second network trained (and
    # hardened elsewhere) like the owner: adaloc.lock.decoy_mask
    "default_decoy": ({}, "decoy", "no_hide"),
    # both (the two signals are apart): the norm-free default since stop 29
    "default_hidefan_decoy": ({}, "decoy", "hide_fanout"),
    "zeros": ({}, "zeros"),
    "matched": ({}, "matched"),
    "noise": ({}, "noise"),
    "key20": ({"budget": 0.2}, "matched"),
    "key50": ({"budget": 0.5}, "matched"),
    "profile": ({}, "profile"),
    "first": ({"selection": "first"}, DEFAULT_FILL),
    "random_profile": ({"selection": "random"}, "profile"),
    # SOPHON-style non-transferable training of the owner after key selection
    "sophon": ({}, DEFAULT_FILL, "sophon"),
    "sophon_profile": ({}, "profile", "sophon"),
    "probe": ({}, DEFAULT_FILL, "probe"),
    "probe_first": ({"selection": "first"}, DEFAULT_FILL, "probe"),
    # function-preserving fan-out balancing (positions), alone and after the probe training
    "balance": ({}, DEFAULT_FILL, "balance"),
    "balance_profile": ({}, "profile", "balance"),
    "probe_first_balance": ({"selection": "first"}, DEFAULT_FILL, "probe", "balance"),
    "probe_first_balance_profile": ({"selection": "first"}, "profile", "probe", "balance"),
}


def recipe(name: str, make, cfg: HardenConfig):
    """(KeySpec, fill, hardening or None) of lock ``name``. A ``default*`` lock: the library's
    spec, fill and hardening for ``make()``'s architecture, as the flows lock it (the CNN:
    saliency rows + norm layers + head + stem, matched fill, no hardening; a norm-free MLP:
    first-layer rows, the alpha-6 probe training + polish, hide_fanout, decoy fill), its
    overrides and steps after them; ``cfg``
    (``--harden-alpha`` / ``--harden-steps``) does not apply to it."""
    overrides, fill, *steps = LOCKS[name]
    if name.startswith("default"):
        model = make()
        hc = default_hardening(model)
        spec = dataclasses.replace(default_spec(model), **overrides)
        lib = ([hc.objective] if hc else []) + (["hide_fanout"] if hc and hc.hide_fanout else [])
        steps = list(dict.fromkeys(lib + steps))  # each step once, the library's first
        if "no_hide" in steps:
            steps = [s for s in steps if s not in ("hide_fanout", "no_hide")]
        fill = default_fill(model) if fill == LIBRARY else fill
        cfg = dataclasses.replace(hc or HardenConfig(), seed=cfg.seed)
    else:
        spec = KeySpec(**overrides)
    harden = functools.partial(_harden, tuple(steps), cfg, make) if steps else None
    return spec, fill, harden


def _harden(steps: tuple, cfg: HardenConfig, make, model, mask, train):
    """The lock's hardening steps in order (also what the attacker applies to shadows)."""
    for step in steps:
        if step in ("sophon", "probe"):
            objective = "probe" if step == "probe" else "finetune"
            c = dataclasses.replace(cfg, objective=objective)
            model = nontransferable(model, mask, train, fresh_fn(make, cfg.seed + 99), c)
        elif step == "balance":
            model = balance_fanout(model, mask)
        elif step == "hide_fanout":
            model = hide_fanout(model, mask, seed=cfg.seed)
    return model
