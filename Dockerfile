# The images every imgclf Kubeflow component runs in (target `pipeline`, the default) and the
# KServe predictor runs in (target `serving`: `imgclf serve` only, without DVC, Great
# Expectations, KFP or scikit-learn).
#
# Build and push from the repository root, then compile the pipeline against that image:
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/imgclf/imgclf:0.1.0 .
#   docker push ghcr.io/imgclf/imgclf:0.1.0
#   IMGCLF_IMAGE=ghcr.io/imgclf/imgclf:0.1.0 python -m pipelines.training_pipeline
# The model server's image (the InferenceService's image, or the run parameter serving_image):
#   docker build --target serving --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#     -t ghcr.io/imgclf/imgclf-serving:0.1.0 .
# Another CUDA build of torch: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# A CPU-only image (CI, laptops): --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#
# Why python:3.11-slim rather than a CUDA base image: torch's CUDA wheels carry the CUDA
# runtime, cuDNN and NCCL as pip packages, and the node supplies only the driver (through the
# NVIDIA container toolkit). nvidia/cuda would add a second copy of those libraries, and
# pytorch/pytorch another torch than the one pyproject.toml pins. The base is pinned by the
# digest of its multi-platform index (python:3.11-slim-bookworm, Python 3.11.16), so a rebuild
# gets the same OS and Python; to move it, `docker buildx imagetools inspect
# python:3.11-slim-bookworm` and replace the digest.
#
# Layers, slowest-changing first, so that a code change rebuilds in seconds: the locked
# dependencies (requirements/<target>.lock.txt, written by `make lock`, every file's sha256
# checked), then torch from TORCH_INDEX_URL (everything it needs besides its CUDA wheels is
# already there from the lock), then the source, installed without dependencies. `pip check`
# fails the build if the lock and pyproject.toml disagree.
#
# No ENTRYPOINT: KFP sets every component's command. No secrets: S3 credentials arrive at run
# time as environment variables from the imgclf-minio Secret (see k8s/).
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GX_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1

RUN useradd --uid 1000 --user-group --create-home --home-dir /home/imgclf imgclf

WORKDIR /opt/imgclf


# What the model server needs; the pipeline image is this plus the pipeline extra's packages.
FROM base AS serving-deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
COPY requirements/serving.lock.txt requirements/
# --no-build-isolation: a package published only as an sdist builds with the setuptools
# already here (the base image's, then the lock's), never with one downloaded unpinned.
RUN pip install --no-deps --require-hashes --no-build-isolation -r requirements/serving.lock.txt
# torch pinned as in pyproject.toml, so that installing imgclf finds it satisfied. A layer of
# its own (gigabytes of CUDA wheels), kept apart from the lock's.
# hadolint ignore=DL3059
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1


FROM serving-deps AS serving
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . --no-deps --no-build-isolation \
    && pip check \
    && python -c "import imgclf.cli.serve, imgclf.serving.server, imgclf.serving.predictor, torch, kserve"

# Recorded in every model.json (steps/train.py reads $GIT_COMMIT), so a model names its code.
# Declared last: a new commit reuses every layer above.
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="imgclf-serving" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

USER 1000:1000
ENV HOME=/home/imgclf
WORKDIR /home/imgclf
EXPOSE 8080
# KServe's storage initializer puts the model under /mnt/models; the InferenceService
# (k8s/templates/inferenceservice.yaml) sets its own command and arguments anyway.
CMD ["imgclf", "serve", "--model-dir", "/mnt/models", "--http-port", "8080"]


FROM serving-deps AS pipeline
COPY requirements/pipeline.lock.txt requirements/
RUN pip install --no-deps --require-hashes --no-build-isolation -r requirements/pipeline.lock.txt
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
RUN pip install . --no-deps --no-build-isolation \
    && pip check \
    && python -c "import imgclf.steps, components.train.component, pipelines, torch, kfp"

# KFP's launcher stages artifacts under /gcs, /minio and /s3. Recent KFP mounts emptyDirs
# there; for older backends the user must be able to create them.
RUN mkdir -p /gcs /minio /s3 && chown imgclf:imgclf /gcs /minio /s3

ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="imgclf" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

USER 1000:1000
ENV HOME=/home/imgclf
WORKDIR /home/imgclf
