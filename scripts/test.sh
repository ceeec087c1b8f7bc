#!/usr/bin/env bash
# Install what the tests need (idempotent), then lint and run the suite. The slow
# real-stack tests (fault battery, push, browser, generated client) run when
# MAGICFACE_ALL_TESTS=1, as in CI (.ci/run); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
if [ "${MAGICFACE_ALL_TESTS:-0}" = "1" ]; then
    .venv/bin/python -m pytest -q "$@"
else
    .venv/bin/python -m pytest -q -m "not slow" "$@"
fi
