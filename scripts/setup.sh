#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch/torchvision first, pinned: on the development and CI machines pip takes
# these from local disk; elsewhere it downloads them.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
.venv/bin/pip install -q -e ".[test]"
# `magicface eval`'s face metric: facenet-pytorch's metadata pins torch<2.3 and an old
# Pillow, which would downgrade the environment; its code runs on current releases, so
# it goes in without its (already present) dependencies.
if ! .venv/bin/python -c "import facenet_pytorch" 2>/dev/null; then
    .venv/bin/pip install -q --no-deps "facenet-pytorch==2.6.0"
fi
