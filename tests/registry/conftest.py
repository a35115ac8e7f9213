"""An owner with a locked tiny CNN and three key versions, and helpers to publish and pull."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from adaloc.artifact import ModelCard, encode_key, save_base
from adaloc.keys import KeySpec, select_key
from adaloc.lock import Key, lock, state_sha256, unlock
from adaloc.models import build_model

CARD_KWARGS = {"in_channels": 1, "num_classes": 10, "image_size": 28}


@dataclass
class LockedModel:
    """A lock's base folder plus key versions 1..n and the owner's model sha256 for each."""

    base_dir: Path
    base_sha256: str
    keys: dict[int, Key]
    model_sha256: dict[int, str]


def make_locked(root: Path, *, seed: int, versions: int = 3) -> LockedModel:
    """Lock a random-weight CNN; versions 2.. are key-only updates (only key values change)."""
    torch.manual_seed(seed)
    model = build_model("cnn", **CARD_KWARGS)
    spec = KeySpec(budget=0.05, seed=seed)
    mask = select_key(model, spec)
    base, key = lock(model, mask)
    base_dir = root / f"base-{seed}"
    card = ModelCard("cnn", dict(CARD_KWARGS), 10, [1, 28, 28], spec.to_dict())
    saved = save_base(base, card, base_dir)
    keys, shas = {1: key}, {1: state_sha256(unlock(base, key))}
    g = torch.Generator().manual_seed(seed + 1000)
    for v in range(2, versions + 1):
        prev = keys[v - 1]
        values = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in prev.values.items()}
        keys[v] = Key(prev.mask, values, prev.base_sha256, version=v, parent=v - 1)
        shas[v] = state_sha256(unlock(base, keys[v]))
    return LockedModel(base_dir, saved["sha256"], keys, shas)


@pytest.fixture(scope="session", autouse=True)
def _no_mlflow_progress_bars():
    """MLflow's per-download tqdm bars only clutter test output."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's telemetry thread edits os.environ while requests iterates it (KeyError races)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def locked(tmp_path_factory) -> LockedModel:
    """One locked model per test module (a few hundred KB)."""
    return make_locked(tmp_path_factory.mktemp("lock"), seed=0)


def publish(reg, lm: LockedModel, owner, version: int, **kwargs):
    """Publish key version ``version`` of ``lm`` with lineage, metrics and the owner's sha."""
    key = lm.keys[version]
    return reg.publish_key(
        key,
        owner=owner,
        model_sha256=lm.model_sha256[version],
        metrics={"authorized_acc": 0.9 + version / 100, "unauthorized_acc": 0.1},
        params={"stage": f"update-{version}"},
        data_version=f"data-{version}",
        key_spec={"budget": 0.05},
        **kwargs,
    )


def plain_key_bytes(lm: LockedModel, version: int) -> bytes:
    """The encoded plain key, to prove it never reaches the artifact store."""
    return encode_key(lm.keys[version])


def cli_app() -> typer.Typer:
    """The registry sub-apps mounted the way pipelines/cli.py mounts them."""
    from pipelines.keys_cli import keys_app
    from pipelines.registry_cli import registry_app, site_app

    app = typer.Typer()
    app.add_typer(registry_app, name="registry")
    app.add_typer(site_app, name="site")
    app.add_typer(keys_app, name="keys")
    return app


def installed_bytes(site) -> dict[str, bytes]:
    """Every byte of a site's installed set (+ where ``current`` points): equal = untouched."""
    import os

    link = site.directory / "current"
    if not link.is_symlink():
        return {}
    out = {"current": os.readlink(link).encode()}
    for p in sorted((site.directory / "current").iterdir()):
        out[p.name] = p.read_bytes()
    return out


def run_cli(*args: str):
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli_app(), [str(a) for a in args])
