"""Checking a webhook delivery the Standard Webhooks way: `webhook-signature` holds
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">` for each of the sender's secrets."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping

__all__ = ["verify_webhook", "WebhookVerificationError"]


class WebhookVerificationError(Exception):
    """The delivery is not signed with a known secret, or its timestamp is too old."""


def _secret(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64") from None
    return secret.encode()


def verify_webhook(payload: bytes, headers: Mapping[str, str], secret: str | list[str],
                   tolerance_s: float = 300) -> dict:
    """The delivery's JSON payload once its signature matches one of `secret` (a list
    during a rotation) and its timestamp is within `tolerance_s` of now (replays of an
    old delivery fail). Raises WebhookVerificationError."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, ts, sigs = (h.get("webhook-id"), h.get("webhook-timestamp"),
                        h.get("webhook-signature"))
    if not (msg_id and ts and sigs):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or "
                                       "webhook-signature")
    try:
        stamp = int(ts)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a number") from None
    if abs(time.time() - stamp) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    signed = f"{msg_id}.{stamp}.".encode() + payload
    secrets = [secret] if isinstance(secret, str) else list(secret)
    expected = [base64.b64encode(hmac.new(_secret(s), signed, hashlib.sha256).digest())
                for s in secrets]
    for sig in sigs.split(" "):
        version, _, value = sig.partition(",")
        if version != "v1":
            continue
        if any(hmac.compare_digest(value.encode(), e) for e in expected):
            return json.loads(payload)
    raise WebhookVerificationError("no signature matches")
