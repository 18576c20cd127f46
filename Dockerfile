# syntax=docker/dockerfile:1
# Multi-stage image for eas-serve. On a GPU node the default base is a CUDA runtime and pip takes the
# CUDA build of torch 2.13.0 from the package index; the model store is a volume, never baked in
# (except the small embedded demo model that ships inside the package).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY eas ./eas
COPY service ./service
COPY model_store ./model_store
COPY eas_tools ./eas_tools
# torch first and pinned; torchvision is never installed (docs/transformers-notes.md §1).
RUN pip install torch==2.13.0 && pip install .

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 eas
COPY --from=build /opt/venv /opt/venv
LABEL org.opencontainers.image.title="eas-serve" \
      org.opencontainers.image.description="VLM serving with EAS attention skipping beside its baseline"
# Unbuffered: log lines reach `docker logs` / `kubectl logs` as they happen, also on a crash.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    EAS_MODEL_STORE=/data/store
RUN mkdir -p /data/store && chown -R eas /data
USER eas
VOLUME ["/data/store"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health/ready || exit 1
# SIGTERM starts the drain (readiness 503, in-flight work finishes for up to EAS_SHUTDOWN_TIMEOUT_S): give
# the container that long to stop (docker compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["eas", "serve", "--host", "0.0.0.0", "--port", "8000"]
