# syntax=docker/dockerfile:1
# eas-serve images, two targets (deploy/README.md):
#   docker build --target cpu -t eas-serve:0.1.0-cpu .   # CPU wheel of torch from PyTorch's CPU index, no CUDA
#   docker build --target gpu -t eas-serve:0.1.0-gpu .   # CUDA 13.0 runtime base + PyPI's torch 2.13.0 (CUDA 13.0)
# Layers go from the slowest-changing to the fastest: Python, torch, the other dependencies (read from
# pyproject.toml, not from the source), then the source, installed with --no-deps, so editing code rebuilds
# only the last layer. The model store is a volume, never baked in (the small embedded demo model ships
# inside the package). torchvision is never installed (docs/transformers-notes.md §1).
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
# torch 2.13.0 from PyPI is built against CUDA 13.0 (its wheels depend on nvidia-cuda-runtime 13.0.x), so
# the GPU image uses the matching runtime; the host needs a driver that supports CUDA 13.0.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# --- Python on each base ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-python
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHON=python3

FROM ${CUDA_IMAGE} AS gpu-python
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHON=python3.12
# Pinned to Ubuntu 24.04's Python 3.12.3; the glob keeps the distribution's security updates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12=3.12.3-* python3.12-venv=3.12.3-* \
    && rm -rf /var/lib/apt/lists/*

# --- build: venv, torch, dependencies, then the source --------------------------------------------------
FROM cpu-python AS cpu-build
WORKDIR /src
RUN ${PYTHON} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
# The project's dependencies from pyproject.toml alone (torch is already satisfied by the CPU wheel).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY eas ./eas
COPY service ./service
COPY model_store ./model_store
COPY eas_tools ./eas_tools
RUN pip install --no-deps .

FROM gpu-python AS gpu-build
WORKDIR /src
RUN ${PYTHON} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY eas ./eas
COPY service ./service
COPY model_store ./model_store
COPY eas_tools ./eas_tools
RUN pip install --no-deps .

# --- runtime images -------------------------------------------------------------------------------------
FROM gpu-python AS gpu
COPY --from=gpu-build /opt/venv /opt/venv
# Unbuffered: log lines reach `docker logs` / `kubectl logs` as they happen, also on a crash.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    EAS_MODEL_STORE=/data/store \
    EAS_DEVICE=cuda
RUN groupadd --gid 10001 eas && useradd --create-home --uid 10001 --gid 10001 eas && mkdir -p /data/store && chown -R 10001:10001 /data
LABEL org.opencontainers.image.title="eas-serve" \
      org.opencontainers.image.description="VLM serving with EAS attention skipping beside its baseline (GPU, CUDA 13.0)"
USER 10001:10001
VOLUME ["/data/store"]
EXPOSE 8000
# Exec form, no shell and no curl: the venv's Python asks the readiness route (exit 1 on any error or non-2xx).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=3)"]
# SIGTERM starts the drain (readiness 503, in-flight work finishes for up to EAS_SHUTDOWN_TIMEOUT_S): give
# the container that long to stop (docker compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["eas", "serve", "--host", "0.0.0.0", "--port", "8000"]

# Last, so a plain `docker build .` gives the CPU image.
FROM cpu-python AS cpu
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    EAS_MODEL_STORE=/data/store
RUN groupadd --gid 10001 eas && useradd --create-home --uid 10001 --gid 10001 eas && mkdir -p /data/store && chown -R 10001:10001 /data
LABEL org.opencontainers.image.title="eas-serve" \
      org.opencontainers.image.description="VLM serving with EAS attention skipping beside its baseline (CPU)"
USER 10001:10001
VOLUME ["/data/store"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=3)"]
STOPSIGNAL SIGTERM
CMD ["eas", "serve", "--host", "0.0.0.0", "--port", "8000"]
