"""DVC: data.dvc names the data version; a real `dvc push`/`pull` through the S3 remote
against the moto endpoint; a changed data directory is a new data version; a flow that
trains pulls the recorded version and refuses files that don't match it."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys

import pytest

from pipelines.data_version import (
    UNTRACKED,
    DataVersionMismatch,
    checkout_data,
    data_changed,
    data_version,
    dvc,
)
from tests.pipelines.conftest import REPO, copy_data

pytestmark = pytest.mark.slow


def test_committed_data_dvc_names_a_directory_version():
    version = data_version(REPO / "data.dvc")
    assert version.endswith(".dir") and len(version) == 36
    assert data_version(REPO / "missing.dvc") == UNTRACKED
    assert data_changed(version, None) and not data_changed(version, version)
    assert not data_changed(UNTRACKED, version)


def test_dvc_push_pull_through_s3_remote(tmp_path, s3_endpoint):
    project = tmp_path / "project"
    data = copy_data(project)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    shutil.copytree(
        REPO / ".dvc",
        project / ".dvc",
        ignore=shutil.ignore_patterns("cache", "tmp", "storage", "config.local"),
    )
    (project / ".dvcignore").write_text("")
    dvc("remote", "modify", "--local", "s3", "endpointurl", s3_endpoint.url, cwd=project)
    dvc("remote", "modify", "--local", "s3", "url", f"s3://{s3_endpoint.bucket}/dvc", cwd=project)
    first = data_version(REPO / "data.dvc")
    dvc("add", "data", cwd=project)
    assert data_version(project / "data.dvc") == first, "data/ differs from the committed data.dvc"
    dvc("push", "-r", "s3", cwd=project)
    keys = [
        o["Key"]
        for o in s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="dvc/")[
            "Contents"
        ]
    ]
    assert len(keys) >= 5  # four files + the .dir manifest

    shutil.rmtree(data)
    shutil.rmtree(project / ".dvc" / "cache")
    dvc("pull", "-r", "s3", cwd=project)
    cmp = filecmp.dircmp(REPO / "data", data)
    assert not cmp.diff_files and not cmp.left_only, (cmp.diff_files, cmp.left_only)

    (data / "extra-labels.txt").write_text("a new data drop\n")
    dvc("add", "data", cwd=project)
    assert data_version(project / "data.dvc") != first
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "-c", "-r", "s3"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert "new" in proc.stdout  # the new version is not pushed yet


def test_training_data_is_the_recorded_version(tmp_path, prefect_api):
    """A worker without the files pulls them from the DVC remote; changed files (or another
    version asked for) stop the flow before it trains, and nothing on disk is overwritten."""
    from pipelines.flows.lock import lock_flow
    from registry import KeyRegistry
    from tests.pipelines.conftest import make_owner_and_site, tiny_overrides

    project = tmp_path / "project"
    data = copy_data(project)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    dvc("init", "-q", cwd=project)
    dvc("remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=project)
    dvc("add", "data", cwd=project)
    dvc("push", cwd=project)
    dvc_file = project / "data.dvc"
    version = data_version(dvc_file)
    assert checkout_data(dvc_file) == version

    shutil.rmtree(data)  # a worker that never had the files
    shutil.rmtree(project / ".dvc" / "cache")
    assert checkout_data(dvc_file, expected=version) == version
    cmp = filecmp.dircmp(REPO / "data" / "fashion-mnist", data / "fashion-mnist")
    assert not cmp.diff_files and not cmp.left_only, (cmp.diff_files, cmp.left_only)

    with pytest.raises(DataVersionMismatch, match="not the 0+.dir asked for"):
        checkout_data(dvc_file, expected="0" * 32 + ".dir")

    labels = data / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    changed = labels.read_bytes() + b"x"
    labels.write_bytes(changed)
    with pytest.raises(DataVersionMismatch, match="refusing to train"):
        checkout_data(dvc_file)
    assert labels.read_bytes() == changed, "the changed file was overwritten"

    ov = tiny_overrides(tmp_path, name="dvcguard", data_root=str(data), dvc_file=str(dvc_file))
    make_owner_and_site(tmp_path, ov)
    with pytest.raises(DataVersionMismatch, match="modified"):
        lock_flow(overrides=ov, progress=False)
    assert KeyRegistry(ov["tracking_uri"], "dvcguard").history() == []
