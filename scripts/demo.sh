#!/usr/bin/env bash
# Set up, then run the service end to end on the embedded defaults: Redis (the
# machine's or one started here), the gateway, one worker, one example job over HTTP.
# MAGICFACE_MODEL=<hub id or folder> uses real weights (default: tiny random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if ! command -v redis-server >/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && [ -z "${REDIS_URL:-}" ]; then
    echo "installing redis-server (Debian package)"
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
exec .venv/bin/python scripts/demo_service.py
