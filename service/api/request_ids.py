"""Request ids: the client's `X-Request-ID` when it is a sane token, else a new one.
Echoed on every response; client messages name it, the server log holds the detail."""

from __future__ import annotations

import re
import uuid

from fastapi import Request

__all__ = ["HEADER", "request_id", "new_request_id"]

HEADER = "x-request-id"
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_request_id(given: str | None) -> str:
    return given if given and _TOKEN.fullmatch(given) else uuid.uuid4().hex


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "-"
