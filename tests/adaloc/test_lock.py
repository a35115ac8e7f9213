"""Lock/unlock exactness, fingerprints and the guarantee that key-only training keeps the lock."""

from __future__ import annotations

import copy

import pytest
import torch

from adaloc.errors import KeyMismatchError
from adaloc.evaluate import accuracy, evaluate_lock
from adaloc.keys import KeySpec, select_key
from adaloc.lock import extract_key, lock, outside_key_sha256, state_sha256, unlock
from adaloc.training import TrainConfig, fit


@pytest.mark.parametrize("fill", ["zeros", "noise", "matched", "profile"])
@pytest.mark.parametrize("granularity", ["row", "element"])
def test_unlock_is_bit_identical(trained_tiny, fill, granularity):
    mask = select_key(trained_tiny, KeySpec(budget=0.3, granularity=granularity))
    base, key = lock(trained_tiny, mask, fill=fill)
    assert state_sha256(base) == key.base_sha256 != state_sha256(trained_tiny)
    restored = unlock(base, key)
    assert state_sha256(restored) == state_sha256(trained_tiny)
    for (n, a), b in zip(
        trained_tiny.state_dict().items(), restored.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), n
    assert outside_key_sha256(base, mask) == outside_key_sha256(trained_tiny, mask)


def test_lock_collapses_accuracy(trained_tiny, tiny_data):
    mask = select_key(trained_tiny, KeySpec(budget=0.3))
    base, key = lock(trained_tiny, mask)
    res = evaluate_lock(base, key, tiny_data, num_classes=4)
    assert res["authorized_acc"] == accuracy(trained_tiny, tiny_data)
    assert res["authorized_acc"] > 0.9
    assert res["unauthorized_acc"] <= res["chance"] + 0.1
    assert res["random_key_acc"] < res["authorized_acc"] - 0.3


def test_wrong_base_refused_and_base_untouched(trained_tiny):
    mask = select_key(trained_tiny, KeySpec(budget=0.3))
    base, key = lock(trained_tiny, mask)
    other, _ = lock(trained_tiny, mask, fill="noise", seed=5)
    before = state_sha256(other)
    with pytest.raises(KeyMismatchError, match="pull the matching base"):
        unlock(other, key)
    assert state_sha256(other) == before


def test_key_of_wrong_shape_refused(trained_tiny):
    mask = select_key(trained_tiny, KeySpec(budget=0.3))
    base, key = lock(trained_tiny, mask)
    name = key.mask.names[0]
    key.values[name] = key.values[name][:-1]
    with pytest.raises(KeyMismatchError, match="shape"):
        unlock(base, key)


@pytest.mark.parametrize(
    "optimizer,weight_decay", [("sgd", 5e-4), ("sgd", 0.0), ("adamw", 0.1), ("adam", 1e-3)]
)
@pytest.mark.parametrize("bn_stats", ["key", "freeze"])
def test_key_only_training_preserves_every_non_key_value(
    trained_tiny, tiny_data, optimizer, weight_decay, bn_stats
):
    """Lock preservation, mechanically: N steps with momentum / AdamW decay move only the key."""
    model = copy.deepcopy(trained_tiny)
    mask = select_key(model, KeySpec(budget=0.3, bn_stats=bn_stats))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, optimizer=optimizer, lr=0.01, weight_decay=weight_decay)
    fit(model, tiny_data, cfg, mask=mask, progress=False)
    after = model.state_dict()
    changed_key = False
    for name, old in before.items():
        new = after[name]
        if name in mask.indices:
            pos = mask.positions(name, old)
            assert torch.equal(new[~pos], old[~pos]), f"{name} moved outside the key"
            changed_key |= not torch.equal(new[pos], old[pos])
        else:
            assert torch.equal(new, old), f"{name} is outside the key but changed"
    assert changed_key, "key-only training did not train the key"
    # requires_grad flags are restored
    assert all(p.requires_grad for p in model.parameters())


def test_key_versions_share_the_base(trained_tiny, tiny_data):
    mask = select_key(trained_tiny, KeySpec(budget=0.3))
    base, key1 = lock(trained_tiny, mask)
    model = unlock(base, key1)
    fit(model, tiny_data, TrainConfig(epochs=1, lr=0.01), mask=mask, progress=False)
    key2 = extract_key(model, mask, base_sha256=key1.base_sha256, version=2, parent=1)
    assert state_sha256(unlock(base, key2)) == state_sha256(model)
    assert outside_key_sha256(model, mask) == outside_key_sha256(base, mask)


def test_decoy_fill_takes_a_donors_rows_elsewhere_hardened(trained_tiny):
    from adaloc.errors import ConfigError
    from adaloc.keys import rows_view
    from adaloc.lock import decoy_mask

    mask = select_key(trained_tiny, KeySpec(budget=0.3, include_stem=False))
    partial = [
        n for n, i in mask.indices.items() if 0 < i.numel() < len(trained_tiny.state_dict()[n])
    ]
    assert partial  # the test needs a tensor keyed in part
    donor = copy.deepcopy(trained_tiny)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(1.0)
    base, key = lock(trained_tiny, mask, fill="decoy", donor=donor)
    state, dstate = base.state_dict(), donor.state_dict()
    for n, idx in mask.indices.items():
        rows, drows = rows_view(state[n], "row"), rows_view(dstate[n], "row")
        if n in partial:
            assert torch.equal(rows[idx], drows[idx]), n  # the donor's rows, same positions
        else:
            assert not rows.any(), n  # keyed whole: zeros
    assert state_sha256(unlock(base, key)) == state_sha256(trained_tiny)  # exact as any fill
    assert outside_key_sha256(base, mask) == outside_key_sha256(trained_tiny, mask)
    with pytest.raises(ConfigError, match="needs donor"):
        lock(trained_tiny, mask, fill="decoy")
    with pytest.raises(ConfigError, match="takes no donor"):
        lock(trained_tiny, mask, fill="matched", donor=donor)
    # where the donor is keyed while it is hardened: as many rows, none of the owner's
    other = decoy_mask(mask, trained_tiny.state_dict(), seed=0)
    for n, idx in mask.indices.items():
        assert other.indices[n].numel() == idx.numel()
        if n in partial:
            assert not set(other.indices[n].tolist()) & set(idx.tolist()), n
        else:
            assert torch.equal(other.indices[n], idx)
        if n.endswith("bias") and n[:-4] + "weight" in partial:
            assert torch.equal(other.indices[n], other.indices[n[:-4] + "weight"])
