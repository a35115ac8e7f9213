"""After a full tiny demo with a token (lock + key-only update, site pulls and exports, the
evaluations), scan everything the run touched for secrets outside their 0600 files. The key
cache is off, so every parent key and the token come from the registry's owner copy.

Scanned: the demo's MLflow store (sqlite db + artifact folder), Prefect's home (the server's
database and logs, and the client's home), the system temp folder the run used, and the
demo's console log. Looked for: every plain key version (the file and windows of its raw
key values), the token (its bytes, which are also the fingerprint's preimage, and its
pixels), and the owner's (signing and recipient) and the site's private keys (PEM and raw
bytes). Also checked: no ``adaloc-*`` scratch folder is left, no plain key is cached, private
files are 0600 and their folders 0700.
"""

from __future__ import annotations

import io
import json
import stat
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from safetensors.torch import load as safetensors_load

from pipelines.config import from_dict
from registry.keyfiles import load_private_key
from tests.pipelines.conftest import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
WINDOW = 32  # bytes of raw key values that would identify a leak (256 bits)


def _raw_private(path: Path) -> list[bytes]:
    key = load_private_key(path)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return [path.read_bytes(), raw]


def _key_needles(data: bytes) -> list[bytes]:
    values = safetensors_load(data)["value"].numpy().tobytes()
    step = max(len(values) // 8, WINDOW)
    windows = [values[i : i + WINDOW] for i in range(0, len(values) - WINDOW + 1, step)]
    return [data, *windows]


def _plain_keys(out: Path, name: str) -> dict[int, bytes]:
    """Every published key version in plain form, opened from the registry's owner copy."""
    from adaloc.artifact import encode_key
    from registry import KeyRegistry, OwnerKeyring
    from registry.mlflow_io import embedded_uris
    from registry.owner_copy import open_owner_copy

    reg = KeyRegistry(embedded_uris(out / "mlflow")[0], name)
    owner = OwnerKeyring(out / "owner")
    return {kv.version: encode_key(open_owner_copy(reg, owner, kv.version)[0])
            for kv in reg.history()}  # fmt: skip


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_server):
    """Run the demo (token on, one update) with its own system temp folder."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.demo import run_demo

    root = tmp_path_factory.mktemp("secrets")
    scratch = root / "tmp"
    scratch.mkdir()
    # secrets, not accuracy: a small slice and an open gate (every version is promoted)
    small = {"train_limit": 1000, "test_limit": 300, "updates": 1}
    gate = {"authorized_threshold": 0.0, "unauthorized_margin": 0.0}
    # cache off: update and evaluate open every parent key (and the token) from the registry
    ov = tiny_overrides(root, name="scan", token="binary", key_cache="off", **small, **gate)
    for k in ("tracking_uri", "artifact_location", "owner_dir"):
        ov.pop(k)  # the demo puts them under its folder
    log = io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.setattr(tempfile, "tempdir", str(scratch))  # mkdtemp() / TemporaryDirectory() go here
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
            summary = run_demo(root / "demo", from_dict(ov), console=Console(file=log))
    finally:
        mp.undo()
    return {"out": root / "demo", "tmp": scratch, "log": log.getvalue(), "summary": summary,
            "prefect_home": Path(prefect_server.env["PREFECT_HOME"])}  # fmt: skip


def _secrets(out: Path) -> tuple[dict[str, list[bytes]], set[Path]]:
    """Needles by what they are, and the files allowed to hold them (all checked 0600)."""
    owner, site = out / "owner", out / "site"
    assert not (owner / "keys").exists(), "a plain key was cached with the cache off"
    keys = _plain_keys(out, "scan")
    assert sorted(keys) == [1, 2], keys
    token = (owner / "token.json").read_bytes()
    pixels = json.dumps(json.loads(token)["pixels"], separators=(",", ":")).encode()
    needles = {
        "owner private key": _raw_private(owner / "owner.key"),
        "owner recipient key": _raw_private(owner / "owner-recipient.key"),
        "site private key": _raw_private(site / "site.key"),
        "token": [token, pixels],
    }
    for v, data in keys.items():
        needles[f"plain key v{v}"] = _key_needles(data)
    allowed = {owner / "owner.key", owner / "owner-recipient.key", site / "site.key"}
    allowed |= {owner / "token.json"}
    allowed |= set((site / "installs").rglob("key.safetensors"))
    allowed |= set((site / "installs").rglob("token.json"))
    allowed |= set((site / "model").glob("*.safetensors"))  # the exported unlocked model
    return needles, allowed


def _scan(roots: list[Path], needles: dict[str, list[bytes]], allowed: set[Path]) -> list[str]:
    found = []
    allowed = {p.resolve() for p in allowed}
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink() or path.resolve() in allowed:
                continue
            data = path.read_bytes()
            for what, ns in needles.items():
                if any(n in data for n in ns):
                    found.append(f"{what} in {path}")
    return found


def test_no_secret_outside_its_private_file(demo):
    needles, allowed = _secrets(demo["out"])
    client_home = Path(__import__("prefect.settings").settings.PREFECT_HOME.value())
    roots = [demo["out"] / "mlflow", demo["prefect_home"], demo["tmp"], demo["out"] / "site"]
    roots += [demo["out"] / "owner"] + ([client_home] if client_home.exists() else [])
    found = _scan(roots, needles, allowed)
    log = demo["log"].encode()
    found += [
        f"{what} in the demo log" for what, ns in needles.items() if any(n in log for n in ns)
    ]
    assert found == []
    assert (demo["out"] / "summary.json").exists()


def test_no_scratch_folder_left_and_private_files_are_0600(demo):
    # our scratch folders (adaloc-*, ddp-base) are gone; torch's own caches
    # (torchinductor_<user>) hold no key material and are not ours to remove
    left = sorted(p.name for p in demo["tmp"].iterdir() if not p.name.startswith("torchinductor_"))
    assert left == []
    _, allowed = _secrets(demo["out"])
    for path in allowed:
        assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"
    site = demo["out"] / "site"
    assert _mode(site / "model") == 0o700
    for d in (site, demo["out"] / "owner", *(site / "installs").iterdir()):
        assert _mode(d) & 0o077 == 0, f"{d} is {oct(_mode(d))}"
