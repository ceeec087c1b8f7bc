"""`python -m service.init_storage`: create STORAGE_URL's bucket if it is missing
(idempotent), then exit: the one-shot init step of a deployment (compose's `init`
service, the Kubernetes Job), so that gateways and workers need not race to do it."""

from __future__ import annotations

import sys

from .settings import Settings
from .storage import StorageError, open_storage


def main() -> int:
    s = Settings()
    try:
        storage = open_storage(s.storage_url, endpoint_url=s.s3_endpoint_url,
                               region=s.s3_region, create_bucket=True)
        storage.check()
    except (StorageError, ValueError) as e:
        print(f"init_storage: {e}", file=sys.stderr)
        return 1
    print(f"storage ready: {s.storage_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
