"""Two Prefect process workers with separate folders share nothing but MLflow (server), S3
(moto) and the DVC remote (on that S3): `lock` runs on worker A, `update` and `evaluate` on
worker B, a site pulls the result (site sha256 = owner's). Worker B opens the parent key
from the registry's owner copy with the owner's secrets from its environment (a mounted
keyring folder + a passphrase file) and never holds a key in plain form on disk; deleting
worker A's key cache changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.data_version import data_version, dvc
from registry.local_servers import DUMMY_AWS_ENV
from tests.pipelines.conftest import PREFECT, REPO, _start, _stop_group, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
PASSPHRASE = "two workers, one owner"
SECRET_FILES = ("owner.key", "owner.pub", "owner-recipient.key", "owner-recipient.pub")
WINDOW = 32  # bytes of raw key values that would identify a leak (256 bits)


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _mount(owner_dir: Path, dst: Path) -> Path:
    """What a secret mount gives a worker: a copy of the owner's keyring files, 0600/0700."""
    dst.mkdir(mode=0o700)
    for name in (*SECRET_FILES, "sites.json"):
        shutil.copy2(owner_dir / name, dst / name)
    (dst / "passphrase").write_text(PASSPHRASE + "\n")
    (dst / "passphrase").chmod(0o600)
    return dst


def _project(folder: Path, s3_url: str, bucket: str, seed: Path | None = None) -> Path:
    """A worker's copy of the DVC project (what a clone holds: git, .dvc/config, data.dvc;
    no data, no cache), its default remote the S3 one (``seed``'s local config, copied)."""
    project = folder / "project"
    project.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    skip = shutil.ignore_patterns("cache", "tmp", "storage", "config.local")
    shutil.copytree(REPO / ".dvc", project / ".dvc", ignore=skip)
    (project / ".dvcignore").write_text("")
    if seed is not None:  # the same settings the seed's `dvc remote` commands wrote
        shutil.copy2(seed / "data.dvc", project / "data.dvc")
        shutil.copy2(seed / ".dvc" / "config.local", project / ".dvc" / "config.local")
        return project
    dvc("remote", "modify", "--local", "s3", "url", f"s3://{bucket}/dvc-two", cwd=project)
    dvc("remote", "modify", "--local", "s3", "endpointurl", s3_url, cwd=project)
    dvc("remote", "default", "--local", "s3", cwd=project)
    return project


def _worker_env(server, folder: Path, secrets: Path, tracking_uri: str, s3_url: str) -> dict:
    env = {k: v for k, v in server.env.items() if not k.startswith(("ADALOC_", "MLFLOW_"))}
    for sub in ("tmp", "prefect-home", "home"):
        (folder / sub).mkdir(exist_ok=True)
    return {
        **env,
        **DUMMY_AWS_ENV,
        "PYTHONPATH": str(REPO),  # the code, as an image or a clone provides it
        "PREFECT_HOME": str(folder / "prefect-home"),
        "TMPDIR": str(folder / "tmp"),  # scratch folders and flow-run dirs land in its folder
        "HOME": str(folder / "home"),
        "ADALOC_HOME": str(folder / "runs"),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "ADALOC_OWNER_DIR": str(secrets),
        "ADALOC_OWNER_PASSPHRASE_FILE": str(secrets / "passphrase"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _deploy(server, flow, pool: str, workdir: Path) -> str:
    """A deployment of ``flow`` (entrypoint: its file, absolute - the code is on every
    worker) on ``pool``, run in the worker's own project folder."""
    import inspect

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.callables import parameter_schema

    flow_name = flow.name
    entrypoint = f"{inspect.getsourcefile(flow.fn)}:{flow.fn.__name__}"

    step = {"prefect.deployments.steps.set_working_directory": {"directory": str(workdir)}}
    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        client.create_deployment(
            flow_id=client.create_flow_from_name(flow_name),
            name=f"two-{flow_name}",
            work_pool_name=pool,
            entrypoint=entrypoint,
            pull_steps=[step],
            parameter_openapi_schema=parameter_schema(flow).model_dump(exclude_unset=True),
            job_variables={"working_dir": str(workdir)},
        )
    return f"{flow_name}/two-{flow_name}"


def _run(server, deployment: str, params: dict) -> str:
    out = server.cli("deployment", "run", deployment, "--params", json.dumps(params),
                     "--watch", "--watch-timeout", "600", timeout=660)  # fmt: skip
    assert "Completed" in out, out
    return out


def _key_needles(data: bytes) -> list[bytes]:
    from safetensors.torch import load

    values = load(data)["value"].numpy().tobytes()
    step = max(len(values) // 8, WINDOW)
    return [data, *(values[i : i + WINDOW] for i in range(0, len(values) - WINDOW + 1, step))]


def _holders(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(str(path))
    return found


def test_lock_on_worker_a_update_and_evaluate_on_worker_b(
    tmp_path, prefect_server, mlflow_server, s3_endpoint
):
    from adaloc.artifact import encode_key
    from adaloc.lock import state_sha256
    from pipelines.flows.evaluate import evaluate_flow
    from pipelines.flows.lock import lock_flow
    from pipelines.flows.update import update_flow
    from registry import KeyRegistry, OwnerKeyring, Site
    from registry.owner_copy import open_owner_copy, signed_targets

    started = time.monotonic()
    tracking = mlflow_server.tracking_uri
    # The owner's machine: an encrypted keyring (signing + recipient key) and one site.
    owner_dir, site_dir = tmp_path / "owner", tmp_path / "site"
    owner_env = {**os.environ, "PYTHONPATH": str(REPO), "ADALOC_OWNER_PASSPHRASE": PASSPHRASE}
    _cli("keys", "owner-init", "--owner-dir", str(owner_dir), "--encrypt", env=owner_env)
    for name in ("owner.key", "owner-recipient.key"):
        assert b"ENCRYPTED PRIVATE KEY" in (owner_dir / name).read_bytes()
    site = Site.init(site_dir, site_id="site-1", tracking_uri=tracking, model_name="two",
                     owner_public_pem=(owner_dir / "owner.pub").read_bytes())  # fmt: skip
    _cli("keys", "site-add", "site-1", str(site_dir / "site.pub"), "--owner-dir",
         str(owner_dir), env=owner_env)  # fmt: skip

    # The DVC remote on S3 holds the data version; workers pull it into their own folders.
    seed = _project(tmp_path / "seed", s3_endpoint.url, s3_endpoint.bucket)
    shutil.copytree(REPO / "data", seed / "data", ignore=shutil.ignore_patterns(".gitignore"))
    dvc("add", "data", cwd=seed)
    assert data_version(seed / "data.dvc") == data_version(REPO / "data.dvc")
    dvc("push", cwd=seed)

    a, b = tmp_path / "worker-a", tmp_path / "worker-b"
    workers = {}
    for folder, pool, cache in ((a, "two-a", "on"), (b, "two-b", "off")):
        project = _project(folder, s3_endpoint.url, s3_endpoint.bucket, seed)
        secrets = _mount(owner_dir, tmp_path / f"{folder.name}-secrets")
        env = _worker_env(prefect_server, folder, secrets, tracking, s3_endpoint.url)
        env["ADALOC_KEY_CACHE"] = cache  # worker B keeps no plain key anywhere
        prefect_server.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
        workers[pool] = (project, secrets, env)
    lock_dep, update_dep, eval_dep = (
        _deploy(prefect_server, flow, pool, workers[pool][0])
        for flow, pool in ((lock_flow, "two-a"), (update_flow, "two-b"), (evaluate_flow, "two-b"))
    )

    # where keys come from, not accuracy: a small slice and an open gate (v2 is promoted)
    small = {"train_limit": 1000, "test_limit": 300, "authorized_threshold": 0.0}
    ov = tiny_overrides(tmp_path, name="two", data_root="data", dvc_file="data.dvc", **small,
                        unauthorized_margin=0.9)  # fmt: skip
    for k in ("tracking_uri", "artifact_location", "owner_dir"):
        ov.pop(k)  # each worker's environment says where the registry and the keyring are
    procs = [
        _start(
            [PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
            env,
            tmp_path / f"{pool}.log",
            workers[pool][0].parent,
        )  # fmt: skip
        for pool, (_, _, env) in workers.items()
    ]
    try:
        _run(prefect_server, lock_dep, {"overrides": ov, "progress": False})
        a_cache = workers["two-a"][1] / "keys" / "key-v1.safetensors"
        key_v1 = a_cache.read_bytes()  # worker A cached it (its cache is on) ...
        shutil.rmtree(a_cache.parent)  # ... and deleting that cache changes nothing
        _run(prefect_server, update_dep, {"overrides": ov, "progress": False})
        _run(prefect_server, eval_dep, {"overrides": ov, "ref": "2"})
    finally:
        for proc in procs:
            _stop_group(proc)
    a_log, b_log = ((tmp_path / f"{p}.log").read_text() for p in ("two-a", "two-b"))
    assert "'lock-two-" in a_log and "'update-two-" not in a_log, a_log[-3000:]
    assert "'update-two-" in b_log and "'evaluate-two-" in b_log and "'lock-two-" not in b_log

    reg = KeyRegistry(tracking, "two")
    history = reg.history()
    assert [kv.version for kv in history] == [1, 2] and history[1].parent == 1
    assert history[1].recipients == ["site-1"]
    eval_metrics = reg.client.get_run(history[1].run_id).data.metrics
    assert "eval_authorized_acc" in eval_metrics

    # The site pulls v2: what it installs is bit-identical to what worker B trained.
    pulled = site.pull("production")
    assert pulled.version == 2
    owner = OwnerKeyring(owner_dir, passphrase=PASSPHRASE.encode())
    tg, _ = signed_targets(reg, owner, 2)
    assert pulled.model_sha256 == tg.model_sha256 == history[1].model_sha256
    assert state_sha256(site.load_model().model) == history[1].model_sha256

    # The registry's owner copy of v1 is the key worker A had cached (so the cache was only
    # a cache); v2 exists nowhere in plain form but in the site's install.
    got_v1, _ = open_owner_copy(reg, owner, 1)
    assert encode_key(got_v1) == key_v1
    key_v2 = encode_key(open_owner_copy(reg, owner, 2)[0])
    needles = _key_needles(key_v1) + _key_needles(key_v2)
    b_secrets = workers["two-b"][1]
    assert _holders(b, needles) == [] and _holders(b_secrets, needles) == []
    assert not (b_secrets / "keys").exists() and not list(b.rglob("*.safetensors"))
    assert list((b / "project" / "data").rglob("*ubyte*")), "worker B pulled no data via DVC"
    print(f"two-worker story: {time.monotonic() - started:.0f}s")
