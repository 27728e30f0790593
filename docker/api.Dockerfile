# syntax=docker/dockerfile:1
# Sealer API image: FastAPI under uvicorn, without torch or CUDA. The compose file also
# runs the one-shot `alembic upgrade head` (service migrate) and the `sealer` CLI from it.
#
#   docker build -f docker/api.Dockerfile -t sealer-api .

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build: a virtual environment with the pinned dependencies and Sealer ----
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /app

# Dependencies first, in their own layer, so that a code change does not reinstall them.
# The base requirements only: the `engine` extra (torch, diffusers) is the worker's.
COPY pyproject.toml ./
COPY docker/constraints.txt docker/list_requirements.py docker/
RUN python docker/list_requirements.py > /tmp/requirements.txt \
    && pip install --no-cache-dir -c docker/constraints.txt -r /tmp/requirements.txt

# Editable install: core.db finds migrations/ and alembic.ini next to the core package,
# so the packages stay in /app beside them instead of moving into site-packages.
COPY core core/
COPY api api/
COPY worker worker/
COPY migrations migrations/
COPY alembic.ini README.md ./
COPY docker/entrypoint.sh docker/start-api.sh docker/
RUN pip install --no-cache-dir --no-deps -e .

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SEALER_DATA_DIR=/var/lib/sealer \
    PROMETHEUS_MULTIPROC_DIR=/tmp/sealer-metrics

RUN groupadd --system --gid 10001 sealer \
    && useradd --system --uid 10001 --gid sealer --home-dir /var/lib/sealer --shell /usr/sbin/nologin sealer \
    && mkdir -p /var/lib/sealer/scratch \
    && chown -R sealer:sealer /var/lib/sealer

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

# Scratch: multipart uploads are spooled here (up to SEALER_MAX_UPLOAD_BYTES each) while
# the API checks them and copies them to the object store.
VOLUME ["/var/lib/sealer/scratch"]

WORKDIR /app
# Numeric, so that runtimes that check for a non-root user (Kubernetes runAsNonRoot) can.
USER 10001:10001

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["/app/docker/start-api.sh"]
