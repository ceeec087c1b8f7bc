#!/usr/bin/env bash
# Create .venv and install both distributions (the library and the server, editable)
# with their test tools, pinned by constraints.txt. Idempotent.
# MAGICFACE_UNPINNED=1 installs the newest versions the pyproject bounds allow instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIN=(-c constraints.txt)
if [ "${MAGICFACE_UNPINNED:-0}" = "1" ]; then
    PIN=()
fi
# torch/torchvision first: on the development and CI machines pip takes them from
# local disk; elsewhere they are the largest download.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q "${PIN[@]}" torch torchvision
fi
.venv/bin/pip install -q "${PIN[@]}" -e . -e "./server[test]"
# `magicface eval`'s face metric: facenet-pytorch's metadata pins torch<2.3 and an old
# Pillow, which would downgrade the environment; its code runs on current releases, so
# it goes in without its (already present) dependencies.
if ! .venv/bin/python -c "import facenet_pytorch" 2>/dev/null; then
    .venv/bin/pip install -q --no-deps "facenet-pytorch==2.6.0"
fi
