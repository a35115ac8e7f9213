# Image for Prefect Docker work pools (the adaloc-gpu / adaloc-cpu pools of prefect.yaml,
# created with --type docker). The flows' pull step still clones the repository at run time,
# so this image only needs the locked dependencies and git; it is rebuilt when
# requirements.lock changes, not for every commit. GPU pools: run it with the NVIDIA
# container runtime; torch's PyPI wheels carry CUDA, and device = "auto" picks it up.
#   docker build -t adaloc:latest .
FROM python:3.11-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/adaloc
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -r requirements.lock
COPY adaloc ./adaloc
COPY registry ./registry
COPY pipelines ./pipelines
RUN pip install --no-cache-dir --no-deps -e . \
    && useradd --create-home --uid 1000 adaloc
USER adaloc
ENV PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
