# One image for the gateway and the GPU worker (the command picks the role).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY magicface_core ./magicface_core
COPY magicface_client ./magicface_client
COPY server_namespace ./server_namespace
COPY service ./service
COPY worker ./worker
RUN pip install --upgrade pip \
    && pip install "torch==2.14.1" "torchvision==0.29.1" \
    && pip install ".[service,sam]"

RUN useradd --create-home --uid 10001 magicface && mkdir -p /data \
    && chown magicface /data
USER magicface
ENV HOST=0.0.0.0 PORT=8000 STORAGE_URL=file:///data HF_HOME=/data/hf
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz')"
CMD ["python", "-m", "service"]
