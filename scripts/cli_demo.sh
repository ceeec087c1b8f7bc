#!/usr/bin/env bash
# Set up, then customize the shipped synthetic example with the CLI.
# MAGICFACE_MODEL=<hub id or folder> uses real weights; the default is the tiny
# random-weight model (runs everywhere, makes noise).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
EX=examples/synthetic
MODEL_ARGS=(--tiny)
if [ -n "${MAGICFACE_MODEL:-}" ] && [ "${MAGICFACE_MODEL}" != "tiny" ]; then
    MODEL_ARGS=(--model "$MAGICFACE_MODEL")
fi
mkdir -p out
.venv/bin/magicface generate "${MODEL_ARGS[@]}" \
    --prompt "a man wearing a hat" --seed 1234 --steps "${STEPS:-50}" \
    --concept "man=$EX/face.png,mask=$EX/face_mask.png,weight=3,ref=a cartoon man" \
    --concept "hat=$EX/hat.png,mask=$EX/hat_mask.png,weight=2,ref=a black hat" \
    --out out/demo.png --save-maps out/demo_maps.png
echo "result: $(pwd)/out/demo.png (semantic map overlay: $(pwd)/out/demo_maps.png)"
