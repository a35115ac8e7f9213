"""Prefect tasks of the lock stage: key selection, the library's hardening, the fill (and
the decoy fill's donor network) and the split into base + key v1."""

from __future__ import annotations

from prefect import task

from pipelines.config import PipelineConfig
from pipelines.tasks import LOCAL, network, train_config


@task(name="select key", **LOCAL)
def select_key(model, cfg: PipelineConfig, train):
    """Choose the key positions (budget, rule, granularity from the config's key spec)."""
    from adaloc.keys import select_key as _select

    return _select(model, cfg.key_spec(), data=train)


def hardens(model) -> bool:
    """True when :func:`harden` changes ``model`` (the library has a hardening for it)."""
    from adaloc.harden import default_hardening

    return default_hardening(model) is not None


@task(name="harden", **LOCAL)
def harden(model, mask, train, bundle, cfg: PipelineConfig):
    """The library's hardening for this architecture, between key selection and the lock
    (:func:`adaloc.harden.harden_default`): a norm-free MLP gets the alpha-6 probe training
    and the key-only polish (the public layers carry nothing a linear probe can use); a
    model with norm layers is returned as is."""
    from adaloc.harden import harden_default

    # the refill attacker's fresh init, simulated during the training (unseeded here: the
    # training seeds the RNG before each draw)
    return harden_default(model, mask, train, lambda: network(bundle, cfg))


def lock_fill(model, token=None) -> str:
    """The fill the lock flow uses for ``model`` (the audit's attacker assumes the same):
    :func:`adaloc.lock.default_fill`, except with an M-LOCK token, where the norm-free
    hardening is skipped and the matched fill stays."""
    from adaloc.lock import DEFAULT_FILL, default_fill

    return DEFAULT_FILL if token is not None else default_fill(model)


@task(name="train decoy donor", **LOCAL)
def train_decoy_donor(model, mask, train, bundle, cfg: PipelineConfig, progress: bool = True):
    """The "decoy" fill's donor: a second network trained like the owner (its own seed),
    then hardened by the same rule with rows keyed away from ``mask``
    (:func:`adaloc.lock.decoy_donor`), so what the base shows at the key positions is a
    trained network's public-like rows. It never leaves this process."""
    import torch

    from adaloc.harden import harden_default
    from adaloc.lock import decoy_donor
    from adaloc.training import fit

    torch.manual_seed(cfg.seed + 1)
    donor = network(bundle, cfg)
    tc = train_config(cfg, key_only=False, seed_offset=1)
    fit(donor, train, tc, desc="train decoy donor", progress=progress)
    donor.to("cpu")

    def harden(net, keyed, data):
        return harden_default(net, keyed, data, lambda: network(bundle, cfg))

    return decoy_donor(donor, mask, model, train, harden, seed=cfg.seed)


@task(name="lock", **LOCAL)
def lock_model(model, mask, seed: int, fill: str | None = None, donor=None):
    """Split the network into the public base and the secret key v1 (``fill``: the
    library's default for the model, :func:`lock_fill`, unless given)."""
    from adaloc.lock import lock

    return lock(model, mask, seed=seed, fill=fill or lock_fill(model), donor=donor)
