"""DVC: data.dvc names the data version; a real `dvc push`/`pull` through the S3 remote
against the moto endpoint; a changed data directory is a new data version."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys

import pytest

from pipelines.data_version import UNTRACKED, data_changed, data_version, dvc
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
