"""Checking a webhook delivery the Standard Webhooks way (https://www.standardwebhooks.com).

The service signs `"{webhook-id}.{webhook-timestamp}.{body}"` with HMAC-SHA256 under each
of its secrets and sends `webhook-signature: v1,<base64> [v1,<base64> ...]`: while a
secret is rotated both keys sign, so a receiver holding either accepts the delivery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["verify_webhook", "WebhookVerificationError"]


class WebhookVerificationError(Exception):
    """The delivery is unsigned, not signed with a known secret, or outside the
    timestamp tolerance (a replay of an old delivery)."""


def _key(secret: str | bytes) -> bytes:
    """The HMAC key of a secret, read as the service reads WEBHOOK_SECRET: `whsec_<base64>`
    is decoded (padding optional, as the reference library allows); bytes are the key
    itself. Any other string is refused: the service signs with whsec_ secrets only."""
    if isinstance(secret, bytes):
        key = secret
    elif secret.startswith("whsec_"):
        b64 = secret[len("whsec_"):]
        try:
            key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    else:
        raise ValueError("a webhook secret is whsec_ followed by base64 (as WEBHOOK_SECRET)")
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def verify_webhook(payload: bytes | str, headers: Mapping[str, str],
                   secret: str | bytes | Sequence[str | bytes],
                   tolerance_s: float = 300) -> Any:
    """The delivery's parsed JSON payload, once it is proven to come from the service.

    `payload` must be the raw request body (re-serialized JSON would not match the
    signature); `headers` any mapping (names are matched case-insensitively); `secret`
    one secret or several (during a rotation: any that matches is enough). A timestamp
    more than `tolerance_s` seconds from now, in either direction, is refused so that a
    captured delivery cannot be replayed later.

    Raises WebhookVerificationError; ValueError for a malformed secret.
    """
    body = payload.encode() if isinstance(payload, str) else bytes(payload)
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (h.get("webhook-id"), h.get("webhook-timestamp"),
                                 h.get("webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or "
                                       "webhook-signature header")
    try:
        ts = int(stamp.strip())
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not whole unix seconds") from None
    if abs(time.time() - ts) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s:g} s "
                                       "from now")
    secrets = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    if not secrets:
        raise ValueError("no webhook secret given")
    signed = f"{msg_id}.{ts}.".encode() + body
    expected = [hmac.new(_key(s), signed, hashlib.sha256).digest() for s in secrets]
    for item in signatures.split():
        version, _, value = item.partition(",")
        if version != "v1":
            continue  # other schemes (v1a: asymmetric) are not used by the service
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Every expected key is compared (no early exit) so that the time taken says
        # nothing about which secret came close.
        if sum(hmac.compare_digest(given, e) for e in expected):
            try:
                return json.loads(body)
            except ValueError:
                raise WebhookVerificationError("the signed payload is not JSON") from None
    raise WebhookVerificationError("no signature matches the secret")
