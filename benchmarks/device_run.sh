#!/usr/bin/env bash
# One device call for the next GPU benchmark round (see benchmarks/README.md):
#   run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=480)
# The device machine has torch but not diffusers and no internet: fetch the wheels here
# first (they go to the git-ignored .whl/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata
# ROUND picks the round (default 7: batching and cold start; 7r: the inductor ratios);
# benchmarks/README.md says what each measures and what the earlier ones found.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ wheels carried: see the header" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "${ROUND:-7}" in
probe)
    python3 benchmarks/attention_bench.py --concepts 2 --fold-multiples 8,16,32 \
        --repeats 10 --out "$out/attn_probe.json" 2>&1 | tee "$out/attn_probe.log"
    python3 benchmarks/gpu_bench.py --no-eager --no-diffusers --no-checks --authors-n '' \
        --n 2 --bias dense,folded,folded:4096 --inductor --inductor-n 2 \
        --inductor-bias folded:4096 --budget-s 190 --out "$out/probe.json" 2>&1 \
        | tee "$out/probe.log"
    ;;
3)
    python3 benchmarks/attention_bench.py --out "$out/attn.json" 2>&1 | tee "$out/attn.log"
    python3 benchmarks/gpu_bench.py --no-eager --no-diffusers --bias dense,folded \
        --authors-n 2 --inductor --inductor-n 2 --inductor-bias folded --inductor-fuse-qkv \
        --profile --budget-s 480 --out "$out/run3.json" 2>&1 | tee "$out/run3.log"
    ;;
5)
    common=(--no-eager --no-diffusers --no-checks --authors-n '' --n 2 --bias folded)
    python3 benchmarks/gpu_bench.py "${common[@]}" --out "$out/run5_layout.json" 2>&1 \
        | tee "$out/run5_layout.log"
    python3 benchmarks/gpu_bench.py "${common[@]}" --channels-last --cudnn-benchmark \
        --out "$out/run5_channels_last.json" 2>&1 | tee "$out/run5_channels_last.log"
    python3 benchmarks/gpu_bench.py "${common[@]}" --n '' --fuse-qkv --inductor \
        --inductor-n 2 --inductor-bias folded --budget-s 240 \
        --out "$out/run5_fused_inductor.json" 2>&1 | tee "$out/run5_fused_inductor.log"
    ;;
7)
    # Batching (graph loop, batched and not alike) and a worker's time to ready, cold
    # and with a warm compile cache (inductor): about 5 minutes.
    python3 benchmarks/batch_bench.py --repeats 3 --cold-start --cold-compile \
        --warmup-batch-max 1 --cold-timeout-s 200 --out "$out/run7_batch.json" 2>&1 \
        | tee "$out/run7_batch.log"
    ;;
7r)
    # The per-image ratios under inductor: vanilla and N=1/2/3, cached and not.
    python3 benchmarks/gpu_bench.py --no-eager --no-diffusers --no-checks --authors-n '' \
        --n '' --bias folded --inductor --inductor-n 1,2,3 --inductor-bias folded \
        --budget-s 300 --out "$out/run7_inductor.json" 2>&1 | tee "$out/run7_inductor.log"
    ;;
*)
    common=(--no-eager --no-diffusers --authors-n '' --n 1,2,3 --bias dense,folded)
    python3 benchmarks/gpu_bench.py "${common[@]}" --preset authors --budget-s 200 \
        --out "$out/run6_authors.json" 2>&1 | tee "$out/run6_authors.log"
    python3 benchmarks/gpu_bench.py "${common[@]}" --preset paper --no-checks --budget-s 150 \
        --out "$out/run6_paper.json" 2>&1 | tee "$out/run6_paper.log"
    ;;
esac
