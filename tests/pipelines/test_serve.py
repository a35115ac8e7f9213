"""Hot swap under load: a real `adaloc serve` subprocess on 127.0.0.1 answers a client that
never stops while the owner publishes v2 and v3 (real `mlflow server` + S3) and the server
pulls them; then a tampered v4 is refused while v3 keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from adaloc.artifact import ModelCard, save_base
from adaloc.keys import KeySpec, select_key
from adaloc.lock import Key, lock, state_sha256, unlock
from adaloc.models import build_model
from registry.local_servers import free_port, wait_http_ok

pytestmark = pytest.mark.slow
ADALOC = str(Path(sys.executable).with_name("adaloc"))
NAME = "served"
KW = {"in_channels": 1, "num_classes": 10, "image_size": 28}


class Owner:
    """A locked random CNN whose key versions change the answers (so versions are told apart)."""

    def __init__(self, root: Path):
        torch.manual_seed(0)
        model = build_model("cnn", **KW)
        spec = KeySpec(budget=0.1)
        self.base, key = lock(model, select_key(model, spec))
        card = ModelCard("cnn", dict(KW), 10, [1, 28, 28], spec.to_dict())
        self.base_dir = root / "base"
        self.base_sha256 = save_base(self.base, card, self.base_dir)["sha256"]
        self.keys = {1: key}
        g = torch.Generator().manual_seed(1)
        for v in range(2, 5):
            prev = self.keys[v - 1]
            values = {n: _nudge(n, t, g) for n, t in prev.values.items()}
            self.keys[v] = Key(prev.mask, values, prev.base_sha256, version=v, parent=v - 1)
        self.x = torch.rand(16, 1, 28, 28, generator=g) ** 3

    def logits(self, version: int) -> torch.Tensor:
        with torch.inference_mode():
            return unlock(self.base, self.keys[version]).eval()(self.x)

    def publish(self, reg, keyring, version: int, aliases=("production",)):
        key = self.keys[version]
        return reg.publish_key(
            key, owner=keyring, model_sha256=state_sha256(unlock(self.base, key)),
            parent=key.parent, aliases=aliases, gate=True,
        )  # fmt: skip


def _nudge(name: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A key-only update's new values (BatchNorm statistics in the key stay valid)."""
    if not t.is_floating_point() or "running_" in name:
        return t
    return t + 0.5 * torch.randn(t.shape, generator=g)


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server):
    from registry.keyring import OwnerKeyring
    from registry.site import Site
    from registry.store import KeyRegistry

    tmp_path = tmp_path_factory.mktemp("serve")
    owner = Owner(tmp_path)
    keyring = OwnerKeyring.init(tmp_path / "owner")
    site = Site.init(
        tmp_path / "site", site_id="edge", model_name=NAME,
        tracking_uri=mlflow_server.tracking_uri, owner_public_pem=keyring.owner_public_pem,
    )  # fmt: skip
    keyring.add_site("edge", site.public_key_pem)
    reg = KeyRegistry(mlflow_server.tracking_uri, NAME)
    reg.publish_base(owner.base_dir, base_sha256=owner.base_sha256)
    owner.publish(reg, keyring, 1)
    return owner, keyring, reg, site


@pytest.fixture(scope="module")
def server(world):
    """`adaloc serve` in its own process group (polling every second); stopped as a group."""
    _, _, _, site = world
    port = free_port()
    log = world[3].directory.parent / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ADALOC, "serve", "--dir", str(site.directory), "--host", "127.0.0.1",
             "--port", str(port), "--poll", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/healthz", timeout_s=120, proc=proc)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


class Client(threading.Thread):
    """Sends the owner's images to /predict back to back; keeps every (status, body)."""

    def __init__(self, url: str, x: torch.Tensor):
        super().__init__(daemon=True)
        self.url, self.body = url, {"inputs": x.tolist(), "return_logits": True}
        self.responses: list[tuple[int, dict]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(f"{self.url}/predict", json=self.body)
                    self.responses.append((r.status_code, r.json()))
                except httpx.HTTPError as err:
                    self.responses.append((0, {"error": str(err)}))

    def wait_for_version(self, version: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(b.get("key_version") == version for _, b in self.responses[-5:]):
                return
            time.sleep(0.1)
        raise AssertionError(f"server never answered with key version {version}")


def test_bad_inputs_are_one_clear_422(world, server):
    """(Runs first, at key version 1.)"""
    url, _ = server
    bad = [
        {"inputs": [[[[0.5] * 28] * 28]] * 2 + [[[[0.5] * 27] * 28]]},  # ragged
        {"inputs": torch.rand(2, 3, 28, 28).tolist()},  # wrong channels
        {"inputs": (torch.rand(1, 1, 28, 28) * 255).tolist()},  # not scaled to [0, 1]
    ]
    for body in bad:
        r = httpx.post(f"{url}/predict", json=body, timeout=30)
        assert r.status_code == 422 and "\n" not in r.json()["detail"], r.text
    r = httpx.post(f"{url}/admin/pull", timeout=60)
    assert r.status_code == 200 and r.json() == {"changed": False, "key_version": 1, "previous": 1}


def test_readme_loader_snippet_runs(world, server, capsys):
    """The README's "Using the installed model" lines, verbatim but for the site path."""
    from tests.pipelines.conftest import REPO

    owner, _, _, site = world
    readme = (REPO / "README.md").read_text()
    block = readme.split("### Using the installed model", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0].replace("/srv/site", str(site.directory))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    served = scope["served"]
    assert served.version == 1 and not served.model.training
    assert capsys.readouterr().out.startswith("1 [")
    assert torch.allclose(served.logits(owner.x), owner.logits(1), rtol=0, atol=1e-5)
    assert site.load_model().version == 1


def test_hot_swap_under_load_and_refused_tamper(world, server, s3_endpoint):
    owner, keyring, reg, _ = world
    url, log = server
    expected = {v: owner.logits(v) for v in range(1, 4)}
    for a, b in ((1, 2), (2, 3), (1, 3)):  # so an answer tells its version (and mixes) apart
        assert (expected[a] - expected[b]).abs().min() > 1e-3
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["key_version"] == 1
    version = httpx.get(f"{url}/version", timeout=10).json()
    assert version["key_version"] == 1 and version["base_sha256"] == owner.base_sha256
    deadline = time.monotonic() + 60  # the pull path is imported in the background after start
    while not httpx.get(f"{url}/version", timeout=10).json()["pull_path_ready"]:
        assert time.monotonic() < deadline, "adaloc serve never imported its pull path"
        time.sleep(0.1)

    client = Client(url, owner.x)
    client.start()
    try:
        client.wait_for_version(1)
        owner.publish(reg, keyring, 2)
        client.wait_for_version(2)  # picked up by the server's own polling
        owner.publish(reg, keyring, 3)
        pulled = httpx.post(f"{url}/admin/pull", timeout=60)  # or on request
        assert pulled.status_code == 200 and pulled.json()["key_version"] == 3, pulled.text
        client.wait_for_version(3)
        n_before_tamper = len(client.responses)

        kv4 = owner.publish(reg, keyring, 4, aliases=())  # not production yet: tamper first
        _tamper(s3_endpoint, kv4)
        reg.set_alias("production", 4, owner=keyring)  # the signed promotion is genuine
        refused = httpx.post(f"{url}/admin/pull", timeout=60)
        assert refused.status_code == 409, refused.text
        reason = refused.json()["refused"]
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert health["key_version"] == 3 and health["last_refused_pull"]["reason"] == reason
        time.sleep(1.5)  # the poller tries v4 again and is refused again
        assert len(client.responses) > n_before_tamper + 3
    finally:
        client.stop.set()
        client.join(timeout=60)

    statuses = [s for s, _ in client.responses]
    assert statuses.count(200) == len(statuses), {s for s in statuses if s != 200}
    seen = [b["key_version"] for _, b in client.responses]
    print(f"{len(seen)} responses, per version {[seen.count(v) for v in (1, 2, 3)]}, 0 failed")
    assert set(seen) == {1, 2, 3} and seen == sorted(seen)  # never back, never v4
    for _, body in client.responses:  # each answer is wholly the owner's model of its version
        want = expected[body["key_version"]]
        assert torch.allclose(torch.tensor(body["logits"]), want, rtol=0, atol=1e-4)
        assert body["predictions"] == want.argmax(1).tolist()
    assert seen[-1] == 3
    assert "pull refused" in log.read_text() and reason in log.read_text()
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "adaloc_key_swaps_total 2.0" in metrics and "adaloc_key_version 3.0" in metrics


def _tamper(s3_endpoint, kv) -> None:
    """Flip one byte of the stored sealed key version in the S3 bucket."""
    s3 = s3_endpoint.client()
    objects = s3.list_objects_v2(Bucket=s3_endpoint.bucket)["Contents"]
    (name,) = [o["Key"] for o in objects if kv.run_id in o["Key"] and o["Key"].endswith(".sealed")]
    blob = bytearray(s3.get_object(Bucket=s3_endpoint.bucket, Key=name)["Body"].read())
    blob[-10] ^= 0x40
    s3.put_object(Bucket=s3_endpoint.bucket, Key=name, Body=bytes(blob))
