"""Issue 13: faults. SIGKILL at random points of `site pull` and of publishing, and the S3
endpoint and the MLflow server restarted mid-pull.

Invariants checked after every kill: the installed set is one version's (key, card, token
and state agree with each other and with the signed hashes), no version is half-visible
(everything the signed timestamp lists is complete and verifies), and the next attempt
succeeds. Trials run in a subprocess killed after a short random delay; loops are bounded.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from adaloc.artifact import save_key
from adaloc.lock import Key
from registry.errors import RegistryError
from registry.keyring import OwnerKeyring
from registry.local_servers import S3Endpoint, free_port, mlflow_server
from registry.site import Site
from registry.store import KeyRegistry
from tests.registry.conftest import installed_bytes, make_locked, publish

pytestmark = pytest.mark.slow
NAME = "faults"
PULL_TRIALS, PUBLISH_TRIALS = 20, 20

# A warm "zygote": imports once, then forks one child per trial (a trial costs the job, not
# the ~2 s of importing mlflow). It makes no request itself, so no socket is shared by fork.
ZYGOTE = """
import json, os, sys
from adaloc.artifact import load_key
from registry.site import Site
from registry.keyring import OwnerKeyring
from registry.store import KeyRegistry

def run(job):
    if job["kind"] == "pull":
        Site(job["dir"]).pull(job["ref"], allow_rollback=True)
    else:
        reg = KeyRegistry(job["uri"], job["name"])
        reg.publish_key(load_key(job["key"]), owner=OwnerKeyring(job["owner"]),
                        auto_version=True, parent=job["parent"])

print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.read(0, 0)
        os.write(w, b"go")
        os.close(w)
        try:
            run(job)
            code = 0
        except BaseException as e:
            sys.stderr.write(repr(e) + "\\n")
            code = 1
        os._exit(code)
    os.close(w)
    os.read(r, 2)  # the child is running its job now
    os.close(r)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
"""


class Zygote:
    """Runs jobs in forked children of one warm process; can SIGKILL a running job."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, job: dict, kill_after: float | None = None) -> tuple[bool, float]:
        """(killed, seconds): the job, SIGKILLed after ``kill_after`` s if still running."""
        import json
        import os

        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        t0 = time.perf_counter()
        killed = False
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                # Still a child of the zygote until it is reaped: the pid cannot be reused.
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        status = json.loads(self.proc.stdout.readline())["status"]
        took = time.perf_counter() - t0
        killed = killed and os.WIFSIGNALED(status)
        assert killed or os.WEXITSTATUS(status) == 0, status
        return killed, took

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def world(mlflow_server, locked, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    owner = OwnerKeyring.init(root / "owner")
    site = Site.init(root / "site", site_id="s", model_name=NAME,
                     tracking_uri=mlflow_server.tracking_uri,
                     owner_public_pem=owner.owner_public_pem)  # fmt: skip
    owner.add_site("s", site.public_key_pem)
    shutil.copytree(site.directory, root / "fresh")
    reg = KeyRegistry(mlflow_server.tracking_uri, NAME)
    reg.publish_base(locked.base_dir, base_sha256=locked.base_sha256)
    for v in (1, 2, 3):
        publish(reg, locked, owner, v, parent=v - 1 if v > 1 else None, aliases=("production",))
    assert site.pull("2").version == 2
    return reg, owner, site, root


def assert_one_version(site: Site, locked) -> int | None:
    """The installed set is consistent: every file of one version, as signed."""
    s = site.installed_set(verify=True)
    if s is None:
        return None
    assert s.model_sha256 == locked.model_sha256[s.version]
    assert s.state["version"] == s.version and s.directory.name.startswith(f"v{s.version}-")
    return s.version


def test_sigkill_during_site_pull(world, locked):
    reg, owner, site, root = world
    rng, zygote = random.Random(13), Zygote()
    outcomes = {"killed": 0, "finished": 0}
    try:
        # One unkilled pull sets the kill window.
        _, span = zygote.run({"kind": "pull", "dir": str(site.directory), "ref": "3"})
        for trial in range(PULL_TRIALS):
            target = root / f"pull-{trial}"
            fresh = trial % 4 == 0  # every 4th trial also downloads the base
            shutil.copytree(root / ("fresh" if fresh else "site"), target, symlinks=True)
            trial_site = Site(target)
            before = assert_one_version(trial_site, locked)
            want = 2 if before == 3 else 3
            job = {"kind": "pull", "dir": str(target), "ref": str(want)}
            killed, _ = zygote.run(job, kill_after=rng.uniform(0.0, span * (2 if fresh else 1)))
            outcomes["killed" if killed else "finished"] += 1
            after = assert_one_version(trial_site, locked)
            assert after in (before, want), (before, want, after)
            # The next attempt succeeds, with no manual cleanup.
            assert trial_site.pull(str(want), allow_rollback=True).version == want
            assert assert_one_version(trial_site, locked) == want
            assert not list((target / "installs").glob(".*.partial"))  # swept by that pull
            shutil.rmtree(target)
    finally:
        zygote.close()
    print(f"site pull SIGKILL trials: {outcomes}, span {span:.2f}s")
    assert outcomes["killed"] >= PULL_TRIALS // 2


_VERIFIED: set[int] = set()


def _signed_versions_complete(reg, owner) -> list[int]:
    """Every version in the signed timestamp verifies end to end (nothing half-visible)."""
    from registry import trust as T
    from registry import trust_io as IO

    _, ts, root, _ = IO.newest_timestamp(reg, T.anchor_root(NAME, owner.owner_public_pem))
    versions = sorted(int(v) for v in IO.all_entries(reg, ts))
    for v in set(versions) - _VERIFIED:  # listed versions never change: check each once
        assert reg.verify(v, owner_public_pem=owner.owner_public_pem)["ok"]
        _VERIFIED.add(v)
    return versions


def test_sigkill_during_publish(world, locked, tmp_path):
    reg, owner, site, root = world
    rng, zygote = random.Random(7), Zygote()
    base_key = locked.keys[3]
    outcomes = {"killed": 0, "finished": 0}
    span = None
    try:
        for trial in range(PUBLISH_TRIALS):
            values = {n: t + 0.001 * (trial + 1) for n, t in base_key.values.items()}
            key = Key(base_key.mask, values, base_key.base_sha256, version=100 + trial, parent=3)
            path = tmp_path / f"key-{trial}.safetensors"
            save_key(key, path)
            before = _signed_versions_complete(reg, owner)
            job = {"kind": "publish", "uri": reg.tracking_uri, "name": NAME, "key": str(path),
                   "owner": str(owner.directory), "parent": 3}  # fmt: skip
            # The first trial runs to the end and sets the kill window.
            killed, took = zygote.run(
                job, kill_after=None if span is None else rng.uniform(0, span)
            )
            span = span or took
            outcomes["killed" if killed else "finished"] += 1
            after = _signed_versions_complete(reg, owner)
            assert set(before) <= set(after) and len(after) <= len(before) + 1
            # The retry (same publication) completes and is pullable; never a second number.
            kv = reg.publish_key(key, owner=owner, auto_version=True, parent=3)
            final = _signed_versions_complete(reg, owner)
            assert kv.version in final and len(final) == len(before) + 1
            mine = [mv for mv in reg._versions(reg.key_name) if mv.tags.get("status") == "ready"
                    and mv.run_id == kv.run_id]  # fmt: skip
            assert len(mine) == 1
    finally:
        zygote.close()
    fresh = Site(shutil.copytree(root / "fresh", root / "after-publish", symlinks=True))
    assert fresh.pull("latest").version == max(final)
    print(f"publish SIGKILL trials: {outcomes}, span {span:.2f}s")
    assert outcomes["killed"] >= PUBLISH_TRIALS // 2


def test_servers_restarted_mid_pull(tmp_path, monkeypatch):
    """S3 endpoint and MLflow server go away during pulls: bounded, one clear error, the
    installed set intact; after they are back the same site pulls again."""
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    s3_port, ml_port = free_port(), free_port()
    s3 = S3Endpoint(f"http://127.0.0.1:{s3_port}", "restart")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    s3.client().create_bucket(Bucket=s3.bucket)
    lm = make_locked(tmp_path, seed=21, versions=3)
    owner = OwnerKeyring.init(tmp_path / "owner")
    server_root = tmp_path / "server"
    try:
        with mlflow_server(server_root, s3=s3, port=ml_port) as server:
            site = Site.init(tmp_path / "site", site_id="r", model_name="restart",
                             tracking_uri=server.tracking_uri,
                             owner_public_pem=owner.owner_public_pem)  # fmt: skip
            owner.add_site("r", site.public_key_pem)
            reg = KeyRegistry(server.tracking_uri, "restart")
            reg.publish_base(lm.base_dir, base_sha256=lm.base_sha256)
            for v in (1, 2, 3):
                publish(reg, lm, owner, v, parent=v - 1 if v > 1 else None)
            assert site.pull("1").version == 1
        # MLflow server down: bounded retries, one clear error, installed set untouched.
        before = installed_bytes(site)
        t0 = time.perf_counter()
        with pytest.raises(RegistryError, match="unavailable|failed after") as err:
            Site(site.directory).pull("2")
        assert time.perf_counter() - t0 < 60 and "\n" not in str(err.value)
        assert installed_bytes(site) == before
        with mlflow_server(server_root, s3=s3, port=ml_port):
            # S3 endpoint stopped while a pull runs in a thread: it fails or completes whole.
            outcome = {}

            def pull() -> None:
                try:
                    outcome["ok"] = Site(site.directory).pull("2").version
                except RegistryError as e:
                    outcome["error"] = str(e)

            thread = threading.Thread(target=pull)
            thread.start()
            time.sleep(random.Random(3).uniform(0.0, 0.3))
            moto.stop()
            thread.join(timeout=120)
            assert not thread.is_alive()
            assert "ok" in outcome or "\n" not in outcome["error"]
            assert assert_one_version(site, lm) in (1, 2)
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
            moto.start()  # moto keeps its buckets in process memory: same objects again
            assert Site(site.directory).pull("2").version == 2
            assert assert_one_version(site, lm) == 2
        # MLflow server restarted in the middle of a pull (thread), then back.
        outcome = {}

        def pull3() -> None:
            try:
                outcome["ok"] = Site(site.directory).pull("3").version
            except RegistryError as e:
                outcome["error"] = str(e)

        with mlflow_server(server_root, s3=s3, port=ml_port):
            thread = threading.Thread(target=pull3)
            thread.start()
            time.sleep(0.05)
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert assert_one_version(site, lm) in (2, 3)
        with mlflow_server(server_root, s3=s3, port=ml_port):
            assert Site(site.directory).pull("3").version == 3
            assert assert_one_version(site, lm) == 3
    finally:
        moto.stop()
