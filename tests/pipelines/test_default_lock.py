"""The lock flow's default lock per architecture: the library's key rule and hardening
(adaloc.keys.default_spec, adaloc.harden.harden_default), as bench/attacks.py's ``default``."""

from __future__ import annotations

import pytest
import torch

from adaloc.data import load_dataset
from adaloc.evaluate import accuracy
from adaloc.keys import fanout, rows_view, select_key
from adaloc.lock import outside_key_sha256, state_sha256, unlock
from adaloc.models import build_model
from adaloc.training import TrainConfig, fit
from pipelines import lock_tasks as LT
from pipelines.config import load_config


def test_key_spec_follows_the_library_rule_per_architecture():
    assert load_config(overrides={"model": "cnn"}).key_spec().selection == "saliency"
    assert load_config(overrides={"model": "resnet18"}).key_spec().selection == "saliency"
    assert load_config(overrides={"model": "mlp"}).key_spec().selection == "first"
    mine = load_config(overrides=["model=mlp", "key.selection=magnitude", "key.budget=0.1"])
    assert (mine.key_spec().selection, mine.key_spec().budget) == ("magnitude", 0.1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trained(name: str, bundle):
    torch.manual_seed(0)
    model = build_model(
        name, in_channels=1, num_classes=bundle.num_classes, image_size=bundle.image_size
    )
    fit(model, bundle.train, TrainConfig(epochs=3, device="cpu"), progress=False)
    return model


def test_harden_task_retrains_the_public_layers_of_a_norm_free_model_only(digits):
    cfg = load_config(overrides={"dataset": "digits", "model": "mlp", "device": "cpu"})
    mlp = _trained("mlp", digits)
    mask = select_key(mlp, cfg.key_spec(), data=digits.train)
    hardened = LT.harden.fn(mlp, mask, digits.train, digits, cfg)
    assert outside_key_sha256(hardened, mask) != outside_key_sha256(mlp, mask)
    assert accuracy(hardened, digits.test) >= accuracy(mlp, digits.test) - 0.03
    # and hide_fanout: each keyed unit's outgoing norm is one a public unit of its layer has
    params = dict(hardened.named_parameters())
    for n, idx in mask.indices.items():
        fan = fanout(params, n) if n.endswith("weight") else None
        if fan is None or idx.numel() in (0, len(fan)):
            continue
        public = torch.ones(len(fan), dtype=torch.bool)
        public[idx] = False
        gap = (fan[idx][:, None] - fan[public][None, :]).abs().amin(1) / fan[public].mean()
        assert float(gap.max()) < 1e-4, n

    cnn_cfg = cfg.replace(model="cnn")
    cnn = _trained("cnn", digits)
    cnn_mask = select_key(cnn, cnn_cfg.key_spec(), data=digits.train)
    assert LT.harden.fn(cnn, cnn_mask, digits.train, digits, cnn_cfg) is cnn


def test_a_norm_free_model_is_locked_with_a_hardened_decoy_donor(digits):
    cfg = load_config(overrides={"dataset": "digits", "model": "mlp", "device": "cpu"})
    cfg = cfg.replace(epochs=3)
    mlp = _trained("mlp", digits)
    assert (LT.lock_fill(mlp), LT.lock_fill(mlp, token=object())) == ("decoy", "matched")
    assert LT.lock_fill(build_model("cnn", in_channels=1, num_classes=10, image_size=8)) == (
        "matched"
    )
    mask = select_key(mlp, cfg.key_spec(), data=digits.train)
    donor = LT.train_decoy_donor.fn(mlp, mask, digits.train, digits, cfg, progress=False)
    base, key = LT.lock_model.fn(mlp, mask, 0, fill="decoy", donor=donor)
    partly = [
        n
        for n, idx in mask.indices.items()
        if n.endswith("weight") and 0 < idx.numel() < mlp.state_dict()[n].shape[0]
    ]
    assert partly
    for n in partly:  # the base shows the donor's (trained, hardened) rows at the key
        rows = rows_view(base.state_dict()[n], "row")[mask.indices[n]]
        assert torch.equal(rows, rows_view(donor.state_dict()[n], "row")[mask.indices[n]])
        assert not torch.equal(rows, rows_view(mlp.state_dict()[n], "row")[mask.indices[n]])
    assert state_sha256(unlock(base, key)) == state_sha256(mlp)  # base + key: the owner
    assert accuracy(donor, digits.test) > 0.5  # a trained network, not noise
