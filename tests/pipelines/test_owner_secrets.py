"""The owner's keyring from a Prefect Secret block: `adaloc keys secret-block` saves it, a
flow with ``owner_secret_block`` opens it (signing + recipient key) in its scratch folder,
which is gone when the run ends; a missing block is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prefect import flow

from adaloc.errors import ConfigError
from pipelines.config import from_dict
from pipelines.flows.common import open_owner
from pipelines.scratch import HOOKS as SCRATCH_HOOKS
from registry.keyring import OWNER_RECIPIENT_ID, RETIRED_RECIPIENTS_DIR, OwnerKeyring
from registry.sealing import generate_site_keys, open_sealed
from tests.pipelines.conftest import REPO

PASSPHRASE = "block passphrase"


@flow(name="probe-owner-secret", **SCRATCH_HOOKS)  # as every adaloc flow: scratch removed
def _probe(config: dict) -> dict:
    owner = open_owner(from_dict(config))
    blob = owner.seal({"key": b"k" * 64}, {"key_version": 1, "base_sha256": "ab" * 32})
    _, parts = open_sealed(blob, site_id=OWNER_RECIPIENT_ID,
                           site_private_key=owner.recipient_key(),
                           owner_public_pem=owner.owner_public_pem)  # fmt: skip
    sites = [s.site_id for s in owner.sites()]
    retired = sorted(p.stem for p in (owner.directory / RETIRED_RECIPIENTS_DIR).glob("*.key"))
    opens = [owner.recipient_key_for(fp) is not None for fp in retired]
    return {"dir": str(owner.directory), "opened": parts["key"] == b"k" * 64, "sites": sites,
            "owner_pub": owner.owner_public_pem, "retired": retired, "opens": opens}  # fmt: skip


def test_flow_opens_the_owner_keyring_from_a_secret_block(tmp_path, prefect_api, monkeypatch):
    env = {**prefect_api.env, "PYTHONPATH": str(REPO), "ADALOC_OWNER_PASSPHRASE": PASSPHRASE}
    owner = OwnerKeyring.init(tmp_path / "owner", passphrase=PASSPHRASE.encode())
    generate_site_keys(tmp_path / "site")
    owner.add_site("plant", tmp_path / "site" / "site.pub")
    earlier = OwnerKeyring.init(tmp_path / "earlier", passphrase=PASSPHRASE.encode())
    retired = owner.retire_recipients_from(earlier)  # as a root rotation leaves it
    cmd = [sys.executable, "-m", "pipelines.cli", "keys", "secret-block", "owner-keyring",
           "--owner-dir", str(owner.directory), "--with-passphrase"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert PASSPHRASE not in proc.stdout + proc.stderr

    cfg = {"name": "blocky", "owner_dir": str(tmp_path / "no-keyring-here"),
           "owner_secret_block": "owner-keyring"}  # fmt: skip
    for var in ("ADALOC_OWNER_PASSPHRASE", "ADALOC_OWNER_PASSPHRASE_FILE"):
        monkeypatch.delenv(var, raising=False)  # the passphrase comes from the block too
    got = _probe(cfg)
    assert got["opened"] and got["sites"] == ["plant"]
    assert got["owner_pub"] == owner.owner_public_pem
    assert got["retired"] == retired and got["opens"] == [True]  # the block carries it
    assert not os.path.exists(got["dir"]), "the keyring outlived the flow run's scratch folder"
    assert not (tmp_path / "no-keyring-here").exists()

    with pytest.raises(ConfigError, match="Secret block 'nope' not found"):
        _probe({**cfg, "owner_secret_block": "nope"})
