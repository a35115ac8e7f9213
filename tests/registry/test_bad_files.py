"""Every owner and site file, broken every way, through the `adaloc` CLI.

Each case copies a finished world (owner keyring with token and a kept key, a site that has
pulled v1, an embedded registry), breaks one file (empty, garbage, truncated, valid JSON of
the wrong shape, the wrong kind of key), runs the command that reads it and checks: exit
code 1 (a typed error, not the CLI's "unexpected" bug line with exit 2), exactly one line on
stderr naming the problem, no traceback, and not one other byte of the owner or site folder
changed. Every case runs the full `adaloc` app in-process (click's runner: an exception that
escaped the CLI shows as ``result.exception``); the first corruption of every file also runs
the real ``adaloc`` executable in a subprocess (a few seconds each: interpreter + imports).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from adaloc.artifact import encode_base, save_key
from adaloc.token import Token
from registry.keyfiles import _private_pem, _public_pem
from registry.keyring import OwnerKeyring
from registry.mlflow_io import embedded_uris
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import make_locked, publish

ADALOC = str(Path(sys.executable).with_name("adaloc"))
NAME = "badfiles"
ED_PRIV = _private_pem(Ed25519PrivateKey.generate())
X_PRIV = _private_pem(X25519PrivateKey.generate())
ED_PUB = _public_pem(Ed25519PrivateKey.generate().public_key())
X_PUB = _public_pem(X25519PrivateKey.generate().public_key())


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


COMMON = {
    "empty": lambda _: b"",
    "garbage": lambda _: b"\x00\xff garbage \x9c\n" * 7,
    "truncated": _truncate,
}
PEM_PRIVATE = {
    **COMMON,
    "public-key-instead": lambda _: ED_PUB,
    "json-instead": lambda _: b'{"format_version": 1}',
}
JSON = {
    **COMMON,
    "json-array": lambda _: b"[1, 2, 3]",
    "wrong-shape": lambda _: b'{"format_version": 1, "sites": "x", "version": "x", "a": [1]}',
    "pem-instead": lambda _: ED_PUB,
}
SAFETENSORS = {
    **COMMON,
    "json-instead": lambda _: b'{"format_version": 1}',
    "base-instead": lambda _: encode_base(__import__("torch").nn.Linear(2, 2)),
}

# (file relative to the world, corruptions, command reading it); {o} owner dir, {s} site dir
OWNER_CASES = [
    ("owner/owner.key", {**PEM_PRIVATE, "wrong-kind": lambda _: X_PRIV}, "owner-check"),
    (
        "owner/owner.pub",
        {**COMMON, "wrong-kind": lambda _: X_PUB, "private-instead": lambda _: ED_PRIV},
        "owner-check",
    ),  # fmt: skip
    ("owner/sites.json", JSON, "site-ls"),
    (
        "owner/sites.json",
        {
            "entry-wrong-shape": lambda _: json.dumps(
                {"format_version": 1, "sites": [{"site_id": 3}]}
            ).encode()
        },
        "owner-check",
    ),  # fmt: skip
    ("owner/token.json", JSON, "owner-check"),
    ("owner/keys/key-v1.safetensors", SAFETENSORS, "owner-check"),
    ("new-site.pub", {**COMMON, "wrong-kind": lambda _: ED_PUB}, "site-add"),
]
SITE_CASES = [
    ("site/site.key", {**PEM_PRIVATE, "wrong-kind": lambda _: ED_PRIV}, "pull"),
    ("site/owner.pub", {**COMMON, "wrong-kind": lambda _: X_PUB}, "pull"),
    ("site/site.json", JSON, "status"),
    ("site/seen.json", JSON, "pull"),
    ("site/current/state.json", JSON, "status"),
    ("site/cache/available.json", JSON, "status"),
    ("site-init-owner.pub", {**COMMON, "wrong-kind": lambda _: X_PUB}, "site-init"),
]


def _cases(table):
    return [
        pytest.param(rel, name, fn, cmd, id=f"{rel}-{name}-{cmd}")
        for rel, kinds, cmd in table
        for name, fn in kinds.items()
    ]


def _first_cases(table):
    out = []
    for rel, kinds, cmd in table:
        name, fn = next(iter(kinds.items()))
        out.append(pytest.param(rel, name, fn, cmd, id=f"{rel}-{name}-{cmd}"))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Owner (token, kept key v1), site with v1 installed, v2 published, cached list."""
    root = tmp_path_factory.mktemp("bad-files")
    lm = make_locked(root, seed=0, versions=2)
    tracking, location = embedded_uris(root / "registry")
    reg = KeyRegistry(tracking, NAME, artifact_location=location)
    owner = OwnerKeyring.init(root / "owner")
    site = Site.init(
        root / "site",
        site_id="lab",
        tracking_uri=tracking,
        model_name=NAME,
        owner_public_pem=owner.owner_public_pem,
    )
    owner.add_site("lab", site.public_key_pem)
    reg.publish_base(lm.base_dir, base_sha256=lm.base_sha256)
    publish(reg, lm, owner, 1)
    reg.promote(1, owner=owner)
    site.pull("production")
    publish(reg, lm, owner, 2)  # pulled by the cases: it opens a sealed blob with site.key
    site.status(online=True)
    Token.generate().save(root / "owner" / "token.json")
    save_key(lm.keys[1], root / "owner" / "keys" / "key-v1.safetensors")
    (root / "new-site.pub").write_bytes(X_PUB)
    (root / "site-init-owner.pub").write_bytes(owner.owner_public_pem)
    for rel in ("site/seen.json", "site/current/state.json", "site/cache/available.json"):
        assert (root / rel).is_file(), f"{rel} missing: the site layout changed?"
    return root


def _command(cmd: str, w: Path) -> list[str]:
    o, s = str(w / "owner"), str(w / "site")
    return {
        "owner-check": ["keys", "owner-check", "--owner-dir", o],
        "site-ls": ["keys", "site-ls", "--owner-dir", o],
        "site-add": ["keys", "site-add", "lab-2", str(w / "new-site.pub"), "--owner-dir", o],
        "pull": ["site", "pull", "2", "--dir", s],
        "status": ["site", "status", "--dir", s, "--offline"],
        "site-init": [
            "site",
            "init",
            "--site-id",
            "lab-3",
            "--dir",
            str(w / "site-3"),
            "--owner-pub",
            str(w / "site-init-owner.pub"),
            "--root",
            str(w / "registry"),
            "-m",
            NAME,
        ],  # fmt: skip
    }[cmd]


def _snapshot(w: Path) -> dict[str, str]:
    """sha256 (or link target) of every file under the world, registry excluded."""
    out = {}
    for p in sorted(w.rglob("*")):
        rel = str(p.relative_to(w))
        if rel.startswith("registry") or p.name == "site.lock":
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"dir {oct(p.stat().st_mode & 0o777)}"
    return out


_CLEAN_ENV = ("ADALOC_DEBUG", "ADALOC_OWNER_PASSPHRASE", "ADALOC_OWNER_PASSPHRASE_FILE")


def _run(cmd: str, w: Path, *, real: bool) -> subprocess.CompletedProcess:
    """Run the command with the real executable (``real``) or the same app in-process."""
    args = _command(cmd, w)
    if not real:
        from typer.testing import CliRunner

        from pipelines.cli import app

        res = CliRunner().invoke(app, args, env=dict.fromkeys(_CLEAN_ENV))
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise AssertionError(f"exception escaped the CLI: {res.exception!r}")
        return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for k in _CLEAN_ENV:
        env.pop(k, None)
    return subprocess.run([ADALOC, *args], capture_output=True, text=True, env=env, timeout=180)


def _check(world: Path, tmp_path: Path, rel: str, corrupt, cmd: str, *, real: bool) -> None:
    w = tmp_path / "w"
    shutil.copytree(world, w, symlinks=True, ignore=shutil.ignore_patterns("registry"))
    os.symlink(world / "registry", w / "registry")  # read-only use: share the registry
    target = w / rel
    target.write_bytes(corrupt(target.read_bytes()))
    before = _snapshot(w)
    proc = _run(cmd, w, real=real)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "unexpected" not in lines[0], lines[0]
    assert _snapshot(w) == before, "a failed command changed local files"


def test_world_commands_succeed_untouched(world, tmp_path):
    """The same commands on the intact copy succeed: the failures below are the file's."""
    w = tmp_path / "w"
    shutil.copytree(world, w, symlinks=True, ignore=shutil.ignore_patterns("registry"))
    os.symlink(world / "registry", w / "registry")
    for cmd in ("owner-check", "site-ls", "status", "site-add", "pull"):
        proc = _run(cmd, w, real=False)
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
    proc = _run("owner-check", w, real=True)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


@pytest.mark.parametrize(("rel", "kind", "corrupt", "cmd"), _cases(OWNER_CASES))
def test_bad_owner_file(world, tmp_path, rel, kind, corrupt, cmd):
    _check(world, tmp_path, rel, corrupt, cmd, real=False)


@pytest.mark.parametrize(("rel", "kind", "corrupt", "cmd"), _cases(SITE_CASES))
def test_bad_site_file(world, tmp_path, rel, kind, corrupt, cmd):
    _check(world, tmp_path, rel, corrupt, cmd, real=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rel", "kind", "corrupt", "cmd"), _first_cases(OWNER_CASES) + _first_cases(SITE_CASES)
)
def test_bad_file_real_executable(world, tmp_path, rel, kind, corrupt, cmd):
    _check(world, tmp_path, rel, corrupt, cmd, real=True)
