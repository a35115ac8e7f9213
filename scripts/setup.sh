#!/usr/bin/env bash
# Set up (or refresh) the project's environment: .venv with the locked packages, plus the
# Debian package that ships Fashion-MNIST. Idempotent; a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d data/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist (the embedded default dataset)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or put its four IDX files in data/fashion-mnist/" >&2
  fi
fi

# PostgreSQL 15 for the MLflow-on-PostgreSQL tests (tests/pg_server.py initdb's a throwaway
# cluster; nothing is started here).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's postgresql-15 (MLflow-on-PostgreSQL tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
  else
    echo "setup: initdb not found; run 'sudo apt-get install postgresql-15'" \
         "for the PostgreSQL tests" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python

# torch/torchvision through pip: this machine's pip finds these exact wheels on local disk
# (uv would download a multi-GB CUDA build). The lock file pins the same versions.
if ! "$VPY" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  echo "setup: installing torch 2.14.1 + torchvision 0.29.1 (about 1.5 min)"
  "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  "$VPY" -m pip install -q "uv==$UV_VERSION"
fi
# uv resolves mlflow + prefect + dvc in seconds; the lock file makes every install the same
.venv/bin/uv pip install -q --python "$VPY" -r requirements.lock
.venv/bin/uv pip install -q --python "$VPY" --no-deps -e .
echo "setup: ready ($("$VPY" -c 'import torch, mlflow, prefect; print(f"torch {torch.__version__}, mlflow {mlflow.__version__}, prefect {prefect.__version__}")'))"
