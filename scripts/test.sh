#!/usr/bin/env bash
# Install what the tests need (idempotent), then lint and run the suite. The slow
# real-stack tests (fault battery, push, browser, generated client, README commands)
# run when MAGICFACE_ALL_TESTS=1, as in CI (.ci/run); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
apt_install() {  # Debian packages the tests drive: installed once, when missing
    if ! command -v "$1" >/dev/null; then
        echo "installing ${*:2} (Debian)"
        apt-get update -qq && apt-get install -y -qq "${@:2}" >/dev/null
    fi
}
apt_install docker-compose docker-compose  # `docker-compose config` checks the compose file
if [ "${MAGICFACE_ALL_TESTS:-0}" = "1" ]; then
    apt_install chromedriver chromium chromium-driver  # the web page's browser tests
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
if [ "${MAGICFACE_ALL_TESTS:-0}" = "1" ]; then
    .venv/bin/python -m pytest -q "$@"
else
    .venv/bin/python -m pytest -q -m "not slow" "$@"
fi
