"""Hardening: the probe-trained base keeps the key holder's accuracy, and its public part
stops carrying linear information; the "first" placement and the "profile" fill."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaloc.data import ImageSet
from adaloc.evaluate import accuracy
from adaloc.harden import HardenConfig, _r2, nontransferable
from adaloc.keys import KeySpec, select_key
from adaloc.lock import lock, unlock
from adaloc.training import TrainConfig, fit


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def _fresh(seed: int = 5):
    def make():
        torch.manual_seed(seed)
        return _mlp()

    return make


def _public_r2(model: nn.Module, mask, data: ImageSet) -> float:
    """R^2 of a ridge probe on the public (non-key) units of the first hidden layer."""
    base, _ = lock(model, mask, fill="zeros")
    public = torch.ones(64, dtype=torch.bool)
    public[mask.indices["1.weight"]] = False
    with torch.no_grad():
        h = base[:3](data.x)[:, public]
    y = nn.functional.one_hot(data.y, 4).float()
    half = len(y) // 2
    return float(_r2(h[:half], y[:half], h[half:], y[half:], 1.0))


def test_probe_hardening_keeps_accuracy_and_hides_features(tiny_data):
    torch.manual_seed(0)
    owner = _mlp()
    fit(owner, tiny_data, TrainConfig(epochs=4, lr=0.05, seed=0, device="cpu"), progress=False)
    mask = select_key(owner, KeySpec(budget=0.3, selection="first"))
    cfg = HardenConfig(steps=150, alpha=3.0, objective="probe", probe_batch=128)
    hard = nontransferable(owner, mask, tiny_data, _fresh(), cfg)
    base, key = lock(hard, mask)
    assert accuracy(unlock(base, key), tiny_data) >= accuracy(owner, tiny_data) - 0.03
    assert accuracy(base, tiny_data) <= 0.35  # still locked (4 classes)
    before, after = _public_r2(owner, mask, tiny_data), _public_r2(hard, mask, tiny_data)
    assert after < before - 0.2, (before, after)


def test_first_selection_fills_the_earliest_tensor_first():
    torch.manual_seed(0)
    model = _mlp()
    mask = select_key(model, KeySpec(budget=0.2, selection="first"))
    # the head is forced; the budget left goes to layer 1's rows before any of layer 2's
    assert "1.weight" in mask.indices and "3.weight" not in mask.indices
    assert torch.equal(mask.indices["1.bias"], mask.indices["1.weight"])


def test_profile_fill_rows_keep_real_tails(trained_tiny):
    """A profile-filled row has a real row's kurtosis (a Gaussian mixture row would not)."""
    mask = select_key(trained_tiny, KeySpec(budget=0.3, include_norm=False, include_head=False))
    name = max(
        (n for n in mask.indices if trained_tiny.state_dict()[n].dim() >= 2),
        key=lambda n: mask.indices[n].numel(),
    )

    def kurt(rows):
        c = rows - rows.mean(1, keepdim=True)
        return (c.pow(4).mean(1) / c.pow(2).mean(1).pow(2)).median()

    w = trained_tiny.state_dict()[name].flatten(1)
    real = torch.ones(len(w), dtype=torch.bool)
    real[mask.indices[name]] = False
    base, _ = lock(trained_tiny, mask, fill="profile")
    got = base.state_dict()[name].flatten(1)[mask.indices[name]]
    ratio = float(kurt(got) / kurt(w[real]))
    assert 0.7 < ratio < 1.4, ratio


def test_key_polish_moves_only_the_key_and_lowers_the_owner_loss(tiny_data):
    """The polish after the probe training: key positions change, all else stays bit-exact."""
    from adaloc.harden import key_polish

    torch.manual_seed(0)
    model = _mlp()
    fit(model, tiny_data, TrainConfig(epochs=1, lr=0.01, seed=0, device="cpu"), progress=False)
    mask = select_key(model, KeySpec(budget=0.3, selection="first"))
    state = model.state_dict()
    pos = {n: mask.positions(n, t) for n, t in state.items() if n in mask.indices}
    before = {n: t.clone() for n, t in state.items()}

    def loss(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(tiny_data.x), tiny_data.y))

    start = loss(model)
    cfg = HardenConfig(polish_steps=60, polish_lr=1e-2)
    key_polish(model, pos, tiny_data, cfg, torch.Generator().manual_seed(0))
    after = model.state_dict()
    for name, t in after.items():
        keyed = pos.get(name, torch.zeros_like(t, dtype=torch.bool))
        assert torch.equal(t[~keyed], before[name][~keyed]), name
    assert any(not torch.equal(after[n][p], before[n][p]) for n, p in pos.items())
    assert loss(model) < start - 0.05, (start, loss(model))


def test_default_rule_hardens_norm_free_nets_only(tiny_data, trained_tiny):
    """Norm layers -> saliency rows and no hardening; none -> "first" rows + the probe
    training: the rule the flows' config uses too."""
    from adaloc.harden import NORM_FREE_HARDENING, default_hardening, harden_default
    from adaloc.keys import default_spec

    assert default_spec(trained_tiny) == KeySpec(selection="saliency")
    assert default_hardening(trained_tiny) is None
    mask = select_key(trained_tiny, default_spec(trained_tiny, budget=0.3), data=tiny_data)
    assert harden_default(trained_tiny, mask, tiny_data, _fresh()) is trained_tiny

    torch.manual_seed(0)
    mlp = _mlp()
    fit(mlp, tiny_data, TrainConfig(epochs=4, lr=0.05, seed=0, device="cpu"), progress=False)
    spec = default_spec(mlp, budget=0.3)
    assert spec.selection == "first" and spec.budget == 0.3
    assert default_hardening(mlp) == NORM_FREE_HARDENING
    mask = select_key(mlp, spec, data=tiny_data)
    hard = harden_default(mlp, mask, tiny_data, _fresh())
    base, key = lock(hard, mask)
    assert accuracy(unlock(base, key), tiny_data) >= accuracy(mlp, tiny_data) - 0.03
    assert _public_r2(hard, mask, tiny_data) < _public_r2(mlp, mask, tiny_data) - 0.2


def _fanout_of(model: nn.Module, consumer: str, units: int) -> torch.Tensor:
    w = model.state_dict()[f"{consumer}.weight"]
    return w.reshape(w.shape[0], units, -1).pow(2).sum((0, 2)).sqrt()


@pytest.mark.parametrize("net", ["mlp", "conv_bn"])
def test_hide_fanout_keeps_the_function_and_gives_keyed_units_public_fanouts(
    net, tiny_data, trained_tiny
):
    from adaloc.harden import hide_fanout

    if net == "mlp":
        torch.manual_seed(0)
        model, x = _mlp(), tiny_data.x[:64]
        spec = KeySpec(budget=0.2, selection="first")
        producer, consumer, units = "1", "3", 64
    else:  # conv -> BatchNorm -> ReLU -> pool -> linear: the BatchNorm (keyed) takes the scale
        model, x = trained_tiny, tiny_data.x[:64]
        spec = KeySpec(budget=0.05, selection="first", include_stem=False)
        producer, consumer, units = "0", "5", 8
    model = model.eval()
    mask = select_key(model, spec)
    keyed = mask.indices[f"{producer}.weight"]
    assert 0 < keyed.numel() < units
    before = _fanout_of(model, consumer, units)
    hidden = hide_fanout(model, mask, seed=3).eval()
    after = _fanout_of(hidden, consumer, units)
    with torch.no_grad():
        assert torch.allclose(hidden(x), model(x), atol=1e-4, rtol=1e-4)  # the same function
    public = torch.ones(units, dtype=torch.bool)
    public[keyed] = False
    assert torch.allclose(after[public], before[public])  # public units untouched
    pool = before[public]
    # every keyed unit's fan-out is now (up to rounding) one of the public units' fan-outs
    assert all(bool(torch.isclose(pool, v, rtol=1e-4).any()) for v in after[keyed])
    assert not torch.allclose(after[keyed], before[keyed])
    # outside the keyed rows and their outgoing columns, every tensor stays as it was
    sa, sb = hidden.state_dict(), model.state_dict()
    for name in sa:
        if name.startswith((f"{producer}.", f"{consumer}.", "1.")):
            continue
        assert torch.equal(sa[name], sb[name]), name
