# syntax=docker/dockerfile:1
# Sealer GPU worker image: one Celery worker process that runs one job at a time on the
# GPU it is given. Run one container per GPU.
#
#   docker build -f docker/worker.Dockerfile -t sealer-worker .
#
# CUDA pairing: torch 2.13.0 from PyPI is the CUDA 13.0 build for Linux x86_64 (its
# metadata requires cuda-toolkit 13.0.3 and nvidia-cudnn-cu13 9.20.0.48), so the base
# image is CUDA 13.0 with cuDNN 9. The host needs an NVIDIA driver of the 580 series or
# newer and a GPU of compute capability 7.5 (Turing) or newer. torch's wheels bring their
# own CUDA and cuDNN libraries; the base image adds the NVIDIA container settings and its
# own copies for other tools.
# NOTE: the base image tag was not pulled where this file was written; check that it
# exists (docker pull) when changing it.
# For a driver older than 580, build a CUDA 12.8 variant, if the PyTorch index has one:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment with torch, the pinned dependencies and Sealer ----
FROM ${CUDA_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12. Its packages are not pinned: the Ubuntu archive keeps
# only the newest build of each, so a pinned version stops installing after an update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app

COPY pyproject.toml ./
COPY docker/constraints.txt docker/list_requirements.py docker/

# torch first and on its own index; docker/constraints.txt pins its pure-Python
# dependencies, and torch pins its CUDA packages exactly.
RUN pip install --no-cache-dir -c docker/constraints.txt --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

RUN python docker/list_requirements.py engine > /tmp/requirements.txt \
    && pip install --no-cache-dir -c docker/constraints.txt -r /tmp/requirements.txt

# open-clip-torch only supplies the CLIP BPE merges file that core/tokenizer.py reads
# (single-file checkpoints and the lab). Without its dependencies, so torchvision stays out.
RUN pip install --no-cache-dir --no-deps open-clip-torch==3.3.0

# Editable install: core.db finds migrations/ and alembic.ini next to the core package,
# so the packages stay in /app beside them instead of moving into site-packages.
COPY core core/
COPY api api/
COPY worker worker/
COPY migrations migrations/
COPY alembic.ini README.md ./
COPY docker/entrypoint.sh docker/
RUN pip install --no-cache-dir --no-deps -e .

# ---- runtime ----
FROM ${CUDA_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SEALER_DATA_DIR=/var/lib/sealer \
    SEALER_SCRATCH_DIR=/var/lib/sealer/scratch \
    SEALER_DEVICE=cuda \
    PROMETHEUS_MULTIPROC_DIR=/tmp/sealer-metrics \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# The interpreter that /opt/venv was created with; same base image, same path.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sealer \
    && useradd --system --uid 10001 --gid sealer --home-dir /var/lib/sealer --shell /usr/sbin/nologin sealer \
    && mkdir -p /var/lib/sealer/scratch /models \
    && chown -R sealer:sealer /var/lib/sealer

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

# Scratch: checkpoints, unpacked models and engine state of the running job (tens of GB
# for SDXL). Models: read-only local evaluator weights (SEALER_CLIP_MODEL_PATH,
# SEALER_CLASSIFIER_PATH point inside it).
VOLUME ["/var/lib/sealer/scratch", "/models"]

WORKDIR /app
# Numeric, so that runtimes that check for a non-root user (Kubernetes runAsNonRoot) can.
USER 10001:10001

# The main Celery process answers the ping while its pool child runs a job.
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.celery_app inspect ping --timeout 20 --destination \"celery@$HOSTNAME\""]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["celery", "-A", "worker.celery_app", "worker", "--concurrency", "1", "--prefetch-multiplier", "1", "--queues", "sealer"]
