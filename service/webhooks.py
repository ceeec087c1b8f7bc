"""Webhooks the Standard Webhooks way (https://www.standardwebhooks.com): what a job's
webhook asks for, and how a delivery is signed.

Each delivery carries `webhook-id` (the same on every retry), `webhook-timestamp`
(seconds) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
for each secret in WEBHOOK_SECRET (a comma-separated list: during a rotation both
keys sign, and receivers accept either). Secrets are the standard's form, `whsec_` and
the key in base64 (padding optional), so the Standard Webhooks libraries verify our
deliveries as they are; any other string is refused at start-up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from .schemas import EventType

__all__ = ["DEFAULT_EVENTS", "parse_events", "secret_bytes", "sign",
           "signature_header", "payload_type"]

MIN_SECRET_BYTES = 16
HOW_TO_MAKE = ("make one with `magicface secret` (or: python -c \"import base64, secrets; "
               "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\")")

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
    """The HMAC key of a `whsec_<base64>` secret. ValueError (naming WEBHOOK_SECRET and
    how to make a secret) for anything else."""
    if not secret.startswith("whsec_"):
        raise ValueError("WEBHOOK_SECRET: each secret must be whsec_ followed by the key in "
                         f"base64 (Standard Webhooks); {HOW_TO_MAKE}")
    b64 = secret[len("whsec_"):]
    try:
        key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"WEBHOOK_SECRET: the part after whsec_ is not base64; "
                         f"{HOW_TO_MAKE}") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"WEBHOOK_SECRET: a key of {len(key)} bytes is too short (at least "
                         f"{MIN_SECRET_BYTES}); {HOW_TO_MAKE}")
    return key



def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(secrets: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def payload_type(event: EventType) -> str:
    """The payload's `type`: job.queued, job.progress, job.succeeded, ..."""
    return f"job.{event.value}"
