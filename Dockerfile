# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target gateway -t magicface-gateway .   # slim: no torch, no CUDA
#   docker build --target worker  -t magicface-worker .    # torch + its CUDA wheels
# Every install is pinned by constraints.txt (the versions the test suite passed with).
# Dependencies go in before the source is copied, so an edit to the code rebuilds only
# the last layers (never torch). The project's version is the installed package's
# (magicface_core/version.py): /healthz and the OpenAPI document report it.

# ---- the project's files, once (both images copy them from here) ----------------------
FROM scratch AS source
COPY pyproject.toml README.md constraints.txt /src/
COPY server /src/server
COPY magicface_core /src/magicface_core
COPY magicface_cli /src/magicface_cli
COPY magicface_client /src/magicface_client
COPY service /src/service
COPY worker /src/worker

# ---- gateway ------------------------------------------------------------------------
FROM python:3.11.10-slim-bookworm AS gateway
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY constraints.txt ./
COPY deploy/requirements-gateway.txt ./deploy/
RUN pip install -c constraints.txt -r deploy/requirements-gateway.txt
COPY --from=source /src ./
# --no-deps: the library's torch/diffusers stay out; the gateway imports only its
# torch-free modules (a test installs this set in a fresh venv and checks).
RUN pip install --no-deps . ./server \
    && useradd --create-home --uid 10001 magicface
USER magicface
ENV HOST=0.0.0.0 PORT=8000 S3_CREATE_BUCKET=false
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=4)"]
CMD ["python", "-m", "service"]

# ---- worker -------------------------------------------------------------------------
# A plain Python base: torch's wheels carry their own CUDA runtime (the nvidia-* wheels
# pinned in constraints.txt), so no CUDA base image can disagree with them; the NVIDIA
# container toolkit mounts the host's driver, which these two variables ask for.
FROM python:3.11.10-slim-bookworm AS worker
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
COPY constraints.txt ./
# torch first, on its own layer: gigabytes that no source edit should invalidate.
RUN pip install -c constraints.txt torch torchvision
COPY --from=source /src ./
RUN pip install -c constraints.txt . "./server[sam]"
# MASK_FACES: facenet-pytorch's MTCNN (its weights ship in the wheel). Its metadata pins
# an old torch, so it goes in without its dependencies, as scripts/setup.sh does.
RUN pip install --no-deps -c constraints.txt facenet-pytorch
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
