"""What every call to the service shares, in both clients: the headers sent with it, the
query of a page of jobs, and an error answer read as a MagicFaceError."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

# The one version of both distributions (magicface_core/version.py, torch-free): the
# User-Agent says which client a request came from.
from magicface_core.version import __version__

from .models import MagicFaceError

__all__ = ["VERSION", "default_headers", "list_params", "raise_for", "retry_after"]

VERSION = __version__


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"magicface-client/{VERSION}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def list_params(status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    q: dict[str, Any] = {"limit": limit}
    if status:
        q["status"] = status
    if cursor:
        q["cursor"] = cursor
    return q


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110 allows both)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def raise_for(r: httpx.Response) -> None:
    """MagicFaceError for an error answer. The body is read first (call after
    `read()`/`aread()` on a streamed response); a body that is not the service's error
    object (a proxy's page) becomes code `http_error` with the text's start."""
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", (r.text[:200] or r.reason_phrase)
    raise MagicFaceError(r.status_code, code, message, retry_after(r.headers.get("Retry-After")))
