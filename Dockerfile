# FedSeek deployment image: one image for every service of docker-compose.yml (SuperLink,
# SuperNode, ServerApp/ClientApp SuperExecs, scheduler, launcher, MLflow server, Ray head).
#
#   docker compose --env-file deploy/coordinator.env --profile coordinator build
#
# CPU (default): python:3.11-slim + the CPU wheel of torch 2.13.0.
# GPU institutions: a CUDA runtime base and a CUDA torch index, e.g.
#   --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
# (set FEDSEEK_BASE / TORCH_INDEX_URL in the institution's env file; pick the CUDA index that
# publishes torch 2.13.0 for your driver). A base without python3.11 gets it from apt.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG PYTHON=python3.11
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The account the services run as. Give it the UID/GID of the host account that owns the
# certificates and keys (they are 0600 and bind-mounted read-only): FEDSEEK_UID=$(id -u).
ARG FEDSEEK_UID=10001
ARG FEDSEEK_GID=10001

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python (only if the base lacks it, e.g. the CUDA images) and a virtual environment
RUN set -eux; \
    if ! command -v "${PYTHON}" >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends "${PYTHON}" "${PYTHON}-venv" ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    "${PYTHON}" -m venv /opt/fedseek
ENV VIRTUAL_ENV=/opt/fedseek \
    PATH=/opt/fedseek/bin:$PATH

# torch first and pinned: PyPI's Linux wheel of torch is the multi-GB CUDA build
RUN set -eux; \
    if [ -n "${TORCH_INDEX_URL}" ]; then set -- --index-url "${TORCH_INDEX_URL}"; fi; \
    pip install "$@" "torch==${TORCH_VERSION}"

# Dependencies from pyproject.toml (a layer that survives source edits), then the package
WORKDIR /app
COPY pyproject.toml ./
RUN set -eux; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt
# /app keeps the project (pyproject.toml with [tool.flwr.app]): `fedseek deploy run` builds the
# Flower app from the working directory
COPY . ./
RUN set -eux; \
    pip install .; \
    rm -rf build *.egg-info; \
    fedseek --help >/dev/null; \
    flower-superlink --help >/dev/null; \
    ray --version

# Non-root service account; the directories that compose mounts volumes on are owned by it
# (a new named volume takes the owner of the directory it is mounted on)
RUN set -eux; \
    groupadd --non-unique --gid "${FEDSEEK_GID}" fedseek; \
    useradd --non-unique --uid "${FEDSEEK_UID}" --gid "${FEDSEEK_GID}" --create-home \
        --shell /usr/sbin/nologin fedseek; \
    mkdir -p /app/runs /var/lib/fedseek /var/lib/fedseek-site /mlflow/artifacts /data /models; \
    chown fedseek:fedseek /app/runs /var/lib/fedseek /var/lib/fedseek-site /mlflow/artifacts
USER fedseek
# FLWR_TELEMETRY_ENABLED=0: no usage events leave a hospital's or bank's host; RAY_worker_niceness=0:
# Ray starts its workers at nice 15 by default, which hands a site's training to any other process
ENV FEDSEEK_HOME=/var/lib/fedseek \
    HF_HUB_OFFLINE=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    RAY_worker_niceness=0

ENTRYPOINT ["fedseek"]
CMD ["--help"]
