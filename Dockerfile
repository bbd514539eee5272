# The one image every imgclf Kubeflow component runs in (and the KServe predictor).
#
# Build and push from the repository root, then compile the pipeline against that image:
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/imgclf/imgclf:0.1.0 .
#   docker push ghcr.io/imgclf/imgclf:0.1.0
#   IMGCLF_IMAGE=ghcr.io/imgclf/imgclf:0.1.0 python -m pipelines.training_pipeline
# Another CUDA build of torch: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# A CPU-only image (CI, laptops): --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#
# Why python:3.11-slim rather than a CUDA base image: torch's CUDA wheels carry the CUDA
# runtime, cuDNN and NCCL as pip packages, and the node supplies only the driver (through the
# NVIDIA container toolkit). nvidia/cuda would add a second copy of those libraries, and
# pytorch/pytorch another torch than the one pyproject.toml pins.
#
# No ENTRYPOINT: KFP sets every component's command. No secrets: S3 credentials arrive at run
# time as environment variables from the imgclf-minio Secret (see k8s/).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Recorded in every model.json (steps/train.py reads $GIT_COMMIT), so a model names its code.
ARG GIT_COMMIT=unknown

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GX_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    GIT_COMMIT=${GIT_COMMIT}

RUN useradd --uid 1000 --user-group --create-home --home-dir /home/imgclf imgclf

WORKDIR /opt/imgclf
# torch first, from the CUDA index and pinned as in pyproject.toml, so that `pip install .`
# finds it satisfied instead of pulling another build.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
RUN pip install . \
    && python -c "import imgclf.steps, components.train.component, pipelines, torch, kfp"

# KFP's launcher stages artifacts under /gcs, /minio and /s3. Recent KFP mounts emptyDirs
# there; for older backends the user must be able to create them.
RUN mkdir -p /gcs /minio /s3 && chown imgclf:imgclf /gcs /minio /s3

USER 1000:1000
ENV HOME=/home/imgclf
WORKDIR /home/imgclf
