#!/usr/bin/env bash
# One device call for the next GPU benchmark round (see benchmarks/README.md):
#   run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=600)
# The device machine has torch but not diffusers and no internet: fetch the wheels here
# first (they go to the git-ignored .whl/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata
# RUN=4 runs the second round (fused projections + tuned inductor) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ wheels carried: see the header" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/attention_bench.py --out "$out/attn.json" 2>&1 | tee "$out/attn.log"
if [ "${RUN:-3}" = 4 ]; then
    python3 benchmarks/gpu_bench.py --inductor --inductor-n 2 --inductor-bias folded \
        --bias folded --fuse-qkv --inductor-options tuned --no-eager --no-diffusers \
        --authors-n '' --out "$out/run4.json" 2>&1 | tee "$out/run4.log"
else
    python3 benchmarks/gpu_bench.py --inductor --inductor-n 2 --inductor-bias folded \
        --no-eager --no-diffusers --authors-n 2 --profile \
        --out "$out/run3.json" 2>&1 | tee "$out/run3.log"
fi
