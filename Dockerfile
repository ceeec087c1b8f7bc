# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target gateway -t magicface-gateway .   # slim: no torch, no CUDA
#   docker build --target worker  -t magicface-worker .    # CUDA + torch, one per GPU
# Dependencies are installed before the source is copied, so an edit to the code
# rebuilds only the last layers (never torch).

# ---- the project's files, once (both images copy them from here) ----------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY magicface_core /src/magicface_core
COPY magicface_client /src/magicface_client
COPY server_namespace /src/server_namespace
COPY service /src/service
COPY worker /src/worker

# ---- gateway ------------------------------------------------------------------------
FROM python:3.11.10-slim-bookworm AS gateway
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY deploy/requirements-gateway.txt ./deploy/
RUN pip install -r deploy/requirements-gateway.txt
COPY --from=source /src ./
# --no-deps: the library's torch/diffusers stay out; the gateway imports only its
# torch-free modules (a test installs this set in a fresh venv and checks).
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 magicface
USER magicface
ENV HOST=0.0.0.0 PORT=8000 S3_CREATE_BUCKET=false
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=4)"]
CMD ["python", "-m", "service"]

# ---- worker -------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS worker
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# torch first, on its own layer: gigabytes that no source edit should invalidate.
RUN pip install "torch==2.14.1" "torchvision==0.29.1"
WORKDIR /app
COPY --from=source /src ./
RUN pip install ".[service,sam]"
# The model cache (HF_HOME) and the compile cache live on volumes owned by the app user:
# a volume mounted on a path the image created inherits its owner.
RUN useradd --create-home --uid 10001 magicface \
    && mkdir -p /data/hf /data/compile-cache \
    && chown -R magicface /data
USER magicface
ENV HF_HOME=/data/hf REQUIRE_GPU=true S3_CREATE_BUCKET=false \
    HEARTBEAT_FILE=/tmp/magicface-worker.heartbeat
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "worker.healthcheck"]
CMD ["python", "-m", "worker"]
