"""The audit's fast attack subset and the optional ``max_attack_leak_pt`` gate field."""

from __future__ import annotations

import time

import pytest
import torch

from adaloc.errors import ConfigError
from pipelines.config import load_config
from pipelines.flows.common import gate

OK = {"authorized_acc": 0.9, "unauthorized_acc": 0.1, "chance": 0.1}


def test_gate_blocks_a_version_whose_leak_is_over_the_limit():
    cfg = load_config(overrides={"max_attack_leak_pt": 2.0})
    passed, _ = gate({**OK, "attack_leak_pt_1pct": 1.5, "attack_leak_pt_5pct": -0.3}, cfg)
    assert passed
    passed, reasons = gate({**OK, "attack_leak_pt_1pct": 0.5, "attack_leak_pt_5pct": 7.25}, cfg)
    assert not passed and "7.25 pt > max_attack_leak_pt 2.0" in reasons[0]
    passed, reasons = gate(OK, cfg)
    assert not passed and "did not run" in reasons[0]
    # 0 (the default): the leak is logged but does not gate
    assert gate({**OK, "attack_leak_pt_1pct": 50.0}, load_config())[0]


def test_gate_field_is_validated():
    with pytest.raises(ConfigError, match="max_attack_leak_pt"):
        load_config(overrides={"max_attack_leak_pt": "high"})


def test_fast_attack_subset_prices_a_locked_base_in_seconds():
    from adaloc.data import load_dataset
    from adaloc.keys import select_key
    from adaloc.lock import lock
    from adaloc.models import build_model
    from adaloc.training import TrainConfig, fit
    from pipelines.attack_tasks import attack_metrics

    cfg = load_config(overrides={"dataset": "digits", "model": "mlp", "device": "cpu"})
    bundle = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(
        "mlp", in_channels=1, num_classes=bundle.num_classes, image_size=bundle.image_size
    )
    fit(model, bundle.train, TrainConfig(epochs=3, device="cpu"), progress=False)
    # the MLP is locked as the lock flow locks it: the decoy fill (donor left unhardened)
    donor = build_model(
        "mlp", in_channels=1, num_classes=bundle.num_classes, image_size=bundle.image_size
    )
    fit(donor, bundle.train, TrainConfig(epochs=3, seed=1, device="cpu"), progress=False)
    base, key = lock(model, select_key(model, cfg.key_spec()), fill="decoy", donor=donor)
    t0 = time.perf_counter()
    out = attack_metrics.fn(base, key, bundle, cfg, 1)
    assert time.perf_counter() - t0 < 60
    assert set(out) == {"attack_leak_pt_1pct", "attack_leak_pt_5pct"}
    assert all(-100 <= v <= 100 for v in out.values())
