"""`magicface serve ...`: the local stack (Redis, the gateway, workers)."""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["serve"]


def serve(rest: list[str]) -> int:
    """`magicface serve ...` is `python -m service.stack ...`: the stack belongs to the
    server distribution, so the CLI hands over to it instead of importing it."""
    if importlib.util.find_spec("service") is None:
        print("magicface: error: serve needs the server: pip install -c constraints.txt "
              "./server (the magicface-server distribution, from the repository)",
              file=sys.stderr)
        return 2
    os.execv(sys.executable, [sys.executable, "-m", "service.stack", *rest])
    return 0  # not reached
