"""`python -m worker.healthcheck`: exit 0 while this container's worker is alive, 1
otherwise. The worker touches HEARTBEAT_FILE each time it renews its registration in
Redis (every WORKER_HEARTBEAT_TTL_S / 3); a file older than WORKER_HEARTBEAT_TTL_S (or
missing) means the loop is stuck, Redis is unreachable, or the model never loaded."""

from __future__ import annotations

import os
import sys
import time

from service.settings import Settings


def main() -> int:
    settings = Settings()
    try:
        age = time.time() - os.stat(settings.heartbeat_file).st_mtime
    except FileNotFoundError:
        print(f"no heartbeat file {settings.heartbeat_file}", file=sys.stderr)
        return 1
    if age > settings.worker_heartbeat_ttl_s:
        print(f"heartbeat {age:.0f} s old (limit {settings.worker_heartbeat_ttl_s} s)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
