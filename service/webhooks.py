"""Webhooks the Standard Webhooks way (https://www.standardwebhooks.com): what a job's
webhook asks for, and how a delivery is signed.

Each delivery carries `webhook-id` (the same on every retry), `webhook-timestamp`
(seconds) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
for each secret in WEBHOOK_SECRET (a comma-separated list: during a rotation both
keys sign, and receivers accept either). A `whsec_` secret is base64 (the standard's
form); any other string is used as its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from .schemas import EventType

__all__ = ["DEFAULT_EVENTS", "parse_events", "secret_bytes", "sign", "signature_header",
           "payload_type"]

# Progress is opt-in: most receivers want the outcome, not 50 step updates.
DEFAULT_EVENTS = frozenset(EventType) - {EventType.PROGRESS}


def parse_events(raw: str | list | None) -> frozenset[EventType]:
    """`webhook_events`: comma-separated (multipart) or a list (JSON); None or empty:
    every event but progress. Raises ValueError naming an unknown event."""
    if raw is None or raw == "" or raw == []:
        return DEFAULT_EVENTS
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be a comma-separated string or a list of event names")
    out = set()
    for item in (i.strip() for i in items):
        try:
            out.add(EventType(item))
        except ValueError:
            names = ", ".join(e.value for e in EventType)
            raise ValueError(f"unknown event {item!r} (events: {names})") from None
    return frozenset(out)


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("WEBHOOK_SECRET: a whsec_ secret must be base64") from None
    return secret.encode()


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(secrets: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def payload_type(event: EventType) -> str:
    """The payload's `type`: job.queued, job.progress, job.succeeded, ..."""
    return f"job.{event.value}"
