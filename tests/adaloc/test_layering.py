"""adaloc/ is pure torch: importing it pulls in no MLOps package."""

from __future__ import annotations

import subprocess
import sys


def test_adaloc_imports_no_mlops_package():
    code = (
        "import sys, adaloc, adaloc.keys, adaloc.lock, adaloc.training, adaloc.artifact, "
        "adaloc.evaluate, adaloc.data, adaloc.models\n"
        "bad = [m for m in ('mlflow', 'prefect', 'boto3', 'dvc', 'registry', 'pipelines') "
        "if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
