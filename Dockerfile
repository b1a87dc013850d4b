# syntax=docker/dockerfile:1
# bnserve's image: the API server (`python -m service`, the default command) or a training
# worker (`python -m service.worker`), one image for both (docker-compose.yml runs the stack).
#
#   docker build -t bnserve .                     # CPU PyTorch (about 1 GB less than CUDA's)
#   docker build -t bnserve:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v bnserve-data:/data bnserve:cuda
#
# The CUDA wheels bring their own CUDA libraries: the host needs only the NVIDIA driver and
# container toolkit. BASE_IMAGE picks another base, e.g. nvidia/cuda:12.8.1-runtime-ubuntu24.04
# (scripts/dev.sh installs Python 3 there with apt-get).
#
# Installed by `scripts/dev.sh install`, the README's own set-up, so there is no second recipe to
# drift from it. tests/test_containers.py checks this file against the code and runs its install
# step in a clean environment; no Docker engine runs on the project's machines.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# scripts/dev.sh's default PyTorch, from PyTorch's CPU index unless told otherwise.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV VENV=/opt/bnserve \
    PATH=/opt/bnserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
# The pip cache is a build cache, not a layer: the image keeps only the environment.
RUN --mount=type=cache,target=/root/.cache/pip scripts/dev.sh install "[postgres,s3]"
# Bytecode made now, as root: the unprivileged user cannot write it next to the code at run time.
RUN python -m compileall -q service models

# Runs as an unprivileged user that owns nothing but the data volume (the code stays root's).
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin bnserve \
    && mkdir -p /data \
    && chown bnserve:bnserve /data

# Listens on every interface of the container. Requests must name an allowed host: by default
# localhost, 127.0.0.1 and ::1 (what `-p 127.0.0.1:8000:8000` clients send); set
# BNSERVE_ALLOWED_HOSTS to the names clients use (comma-separated, e.g. `api.example.com`), and
# put a TLS-ending reverse proxy in front of anything reachable from outside (README, Security).
# The glibc allocator settings the benchmark found best (README, Performance) are applied by
# bnserve itself at start (BNSERVE_MALLOC_TUNING, service/serving/allocator.py), and its
# intra-op threads fit the container's CPUs (BNSERVE_SERVE_THREADS): nothing to set here.
ENV BNSERVE_HOST=0.0.0.0 \
    BNSERVE_PORT=8000 \
    BNSERVE_DATA_DIR=/data

# Checkpoints, datasets, the SQLite registry (without BNSERVE_DATABASE_URL) and the API token.
VOLUME /data
EXPOSE 8000
USER bnserve
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["python", "-m", "service"]
