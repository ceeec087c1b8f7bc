"""`magicface secret`: a fresh Standard Webhooks secret for WEBHOOK_SECRET."""

from __future__ import annotations

import argparse
import base64
import secrets

__all__ = ["secret"]


def secret(args: argparse.Namespace) -> int:
    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    return 0
