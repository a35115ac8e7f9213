"""A site's read caches (registry.record_cache) are only caches: deleting them changes nothing,
a damaged or planted entry is ignored and fetched again, and the hot swap writes key positions
in place (any key after any other, rolled back when the result is not the signed model)."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat

import pytest
import torch

from registry.keyring import OwnerKeyring
from registry.mlflow_io import embedded_uris
from registry.record_cache import HINTS_FILE, RECORDS_DIR
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import installed_bytes, make_locked, publish

NAME = "cachetest"
CACHES = (RECORDS_DIR, "cache/keys", HINTS_FILE)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Embedded registry, owner, one site that pulled v1, and a locked model with 4 versions."""
    root = tmp_path_factory.mktemp("pullcache")
    lm = make_locked(root, seed=3, versions=4)
    tracking, artifacts = embedded_uris(root / "reg")
    reg = KeyRegistry(tracking, NAME, artifact_location=artifacts)
    owner = OwnerKeyring.init(root / "owner")
    site = Site.init(root / "site", site_id="s1", tracking_uri=tracking, model_name=NAME,
                     owner_public_pem=owner.owner_public_pem)  # fmt: skip
    owner.add_site("s1", site.public_key_pem)
    reg.publish_base(lm.base_dir, base_sha256=lm.base_sha256)
    publish(reg, lm, owner, 1, aliases=("production",))
    assert site.pull().version == 1
    return reg, owner, site, lm, root


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_caches_are_filled_private_and_deleting_them_changes_nothing(world):
    reg, owner, site, lm, root = world
    records = list((site.directory / RECORDS_DIR).iterdir())
    assert records and (site.directory / HINTS_FILE).is_file()
    for p in [*records, site.directory / HINTS_FILE, *(site.directory / "cache/keys").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    twin = Site(shutil.copytree(site.directory, root / "twin", symlinks=True))
    for name in CACHES:
        target = twin.directory / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    publish(reg, lm, owner, 2, parent=1, aliases=("production",))
    a, b = site.pull(), twin.pull()
    assert (a.version, a.model_sha256) == (b.version, b.model_sha256) == (2, lm.model_sha256[2])
    assert installed_bytes(site)["key.safetensors"] == installed_bytes(twin)["key.safetensors"]
    # A re-pull with every cache gone finds the same install: nothing to do.
    for name in CACHES:
        target = site.directory / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    before = installed_bytes(site)
    again = site.pull()
    assert not again.changed and installed_bytes(site) == before


def test_damaged_or_planted_cache_entries_are_ignored(world):
    reg, owner, site, lm, _ = world
    site.pull()  # (re)fills the caches for the installed version
    before = installed_bytes(site)
    for p in (site.directory / RECORDS_DIR).iterdir():
        _flip(p)
    again = site.pull()  # reads the targets record again: the damaged copy is not used
    assert not again.changed and installed_bytes(site) == before
    for p in (site.directory / RECORDS_DIR).iterdir():  # the entries were fetched again
        assert p.name == hashlib.sha256(p.read_bytes()).hexdigest()
    # A sealed key planted before its version is published, and hints pointing elsewhere.
    planted = site.directory / "cache/keys/v3.sealed"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"not the owner's sealed key v3")
    hints = json.loads((site.directory / HINTS_FILE).read_text())
    hints["experiment"] = ["999999", "file:///nowhere"]
    hints["trust_runs"] = {"0" * 32: "file:///nowhere/artifacts"}
    (site.directory / HINTS_FILE).write_text(json.dumps(hints))
    publish(reg, lm, owner, 3, parent=2, aliases=("production",))
    r = Site(site.directory).pull()
    assert (r.version, r.model_sha256) == (3, lm.model_sha256[3]) and r.changed
    assert planted.read_bytes() != b"not the owner's sealed key v3"
    assert json.loads((site.directory / HINTS_FILE).read_text())["experiment"][0] != "999999"


def test_key_prefetch_is_used_only_when_the_signed_entry_names_it(world):
    from types import SimpleNamespace

    from registry.prefetch import KeyPrefetch

    reg, owner, site, lm, _ = world
    keys = site.directory / "cache/keys"
    assert (keys / "v3.sealed").is_file()  # held: sizes the prefetch of v4
    publish(reg, lm, owner, 4, parent=3, aliases=("production",))
    state = site.installed()
    r = site.pull()
    assert (r.version, r.model_sha256, r.changed) == (4, lm.model_sha256[4], True)
    assert not list(keys.glob(".*prefetch*"))  # the prefetch file never outlives the pull
    # The same download offered for another signed entry (other run, other hash) is refused.
    kv4 = reg.resolve(4, with_metrics=False)
    pf = KeyPrefetch.start(reg, keys, 99, kv4.run_id, state)
    assert pf is not None
    try:
        real = (keys / "v4.sealed").read_bytes()
        good = SimpleNamespace(run_id=kv4.run_id, path="key/key.sealed", length=len(real),
                               sha256=hashlib.sha256(real).hexdigest())  # fmt: skip
        assert pf.take(good) == real
        assert pf.take(SimpleNamespace(**{**vars(good), "sha256": "0" * 64})) is None
        assert pf.take(SimpleNamespace(**{**vars(good), "run_id": "other"})) is None
    finally:
        pf.close()
    assert not (keys / ".v99.prefetch").exists()


def test_swap_writes_any_key_after_any_other_in_place(world):
    """Key positions change between versions: the base comes back where the old key was."""
    from adaloc.artifact import decode_base
    from adaloc.lock import Key, apply_key, state_sha256
    from registry.errors import IntegrityError
    from registry.loader import InstalledFiles, _check, _write_key

    lm = world[3]
    base, _ = decode_base((lm.base_dir / "base.safetensors").read_bytes(), verify=False)
    state = {k: v.clone() for k, v in base.items()}
    ptrs = {k: v.data_ptr() for k, v in state.items()}
    a = lm.keys[2]
    other = select_key_for(state, seed=7)
    values = {n: torch.randn(i.numel(), *_row_shape(state[n])) for n, i in other.indices.items()}
    b = Key(other, values, lm.base_sha256, version=9)
    rows = _write_key(state, a)
    assert state_sha256(state) == state_sha256(apply_key(base, a, check_base=False))
    rows = _write_key(state, b, a, rows)
    assert state_sha256(state) == state_sha256(apply_key(base, b, check_base=False))
    assert {k: v.data_ptr() for k, v in state.items()} == ptrs  # written in place
    files = InstalledFiles(9, lm.base_dir, b"", b"", None, lm.base_sha256, "0" * 64)
    with pytest.raises(IntegrityError, match="owner-signed model sha256"):
        _check(state, files)
    _write_key(state, a, b, rows)  # what swap_key does when the check fails: a back
    assert state_sha256(state) == lm.model_sha256[2] == state_sha256(apply_key(base, a))


def select_key_for(state: dict, *, seed: int):
    """Another mask over the same tensors (other rows), as a later lock could pick."""
    from adaloc.keys import KeyMask, rows_view

    g = torch.Generator().manual_seed(seed)
    names = sorted(n for n, t in state.items() if t.is_floating_point() and t.dim() >= 2)[:3]
    idx = {}
    for n in names:
        rows = rows_view(state[n], "row").shape[0]
        idx[n] = torch.randperm(rows, generator=g)[: max(1, rows // 4)].sort().values
    return KeyMask(idx, "row")


def _row_shape(t: torch.Tensor) -> tuple[int, ...]:
    from adaloc.keys import rows_view

    return (rows_view(t, "row").shape[1],)


def test_head_key_copy_is_used_when_it_matches_the_signed_head_and_ignored_when_not(
    tmp_path, monkeypatch
):
    """A pull of ``production`` reads the owner's copy of the head's sealed key (asked for
    beside the timestamp) instead of the version's own key; a copy that differs from the
    signed head (tampered, or not yet rewritten) is dropped and the version's key fetched."""
    from registry import chain as C
    from registry import run_io
    from registry import trust_io as IO
    from registry.release import trust_run

    lm = make_locked(tmp_path, seed=5, versions=3)
    tracking, artifacts = embedded_uris(tmp_path / "reg")
    reg = KeyRegistry(tracking, "headcopy", artifact_location=artifacts)
    owner = OwnerKeyring.init(tmp_path / "owner")
    site = Site.init(tmp_path / "site", site_id="s1", tracking_uri=tracking,
                     model_name="headcopy", owner_public_pem=owner.owner_public_pem)  # fmt: skip
    owner.add_site("s1", site.public_key_pem)
    reg.publish_base(lm.base_dir, base_sha256=lm.base_sha256)
    publish(reg, lm, owner, 1, aliases=("production",))
    assert site.pull().version == 1
    read, original = [], run_io.fetch_file

    def spy(store, run_id, path, dst, **kw):
        read.append(path)
        return original(store, run_id, path, dst, **kw)

    monkeypatch.setattr(run_io, "fetch_file", spy)
    publish(reg, lm, owner, 2, parent=1, aliases=("production",))
    read.clear()
    r = site.pull("production")
    assert (r.version, r.model_sha256, r.changed) == (2, lm.model_sha256[2], True)
    assert IO.head_key_path("production") in read and "key/key.sealed" not in read
    # The copy replaced by other bytes after v3's timestamp was signed: refused, v3 installed.
    publish(reg, lm, owner, 3, parent=2, aliases=("production",))
    copy = IO.head_key_path("production").rsplit("/", 1)
    C.upload(reg, trust_run(reg, owner), copy[0], copy[1], b"\0" * 4096)
    read.clear()
    r = site.pull("production")
    assert (r.version, r.model_sha256, r.changed) == (3, lm.model_sha256[3], True)
    assert IO.head_key_path("production") in read and "key/key.sealed" in read
    assert not list((site.directory / "cache/keys").glob(".*prefetch*"))
    assert IO.head_key_path(3) is None and IO.head_key_path("v3") is None


def test_swap_from_the_pull_in_memory_equals_the_swap_from_disk(world):
    """``swap_key(pulled=)`` swaps in the key the pull verified (no read-back); the result
    is the owner's model, as the swap from the installed files is; a key for the same
    positions with a wrong shape is refused before any write."""
    from adaloc.errors import KeyMismatchError
    from adaloc.lock import Key, state_sha256
    from registry.loader import _write_key, load_model, swap_key

    reg, owner, site, lm, _ = world
    a, b = load_model(site, device="cpu"), load_model(site, device="cpu")
    for version in (2, 3):
        r = site.pull(version, allow_rollback=True)
        assert r.changed and r.verified is not None and r.verified.key.version == version
        assert "verified" not in r.to_dict() and json.dumps(r.to_dict())
        swap_key(a, site, pulled=r)
        swap_key(b, site)
        for m in (a, b):
            assert (m.version, state_sha256(m.model)) == (version, lm.model_sha256[version])
    again = site.pull(3)
    assert not again.changed and again.verified is None
    key = a.key
    bad = Key(key.mask, {n: v[:, :0] for n, v in key.values.items()}, key.base_sha256, 9)
    before = state_sha256(a.model)
    with pytest.raises(KeyMismatchError, match="have shape"):
        _write_key(a.model.state_dict(), bad, key, a.base_rows)
    assert state_sha256(a.model) == before
