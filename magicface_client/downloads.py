"""A job's PNGs: which may be asked for, where a redirect to storage leads, and the
bytes written where the caller wants them."""

from __future__ import annotations

from pathlib import Path

import httpx

__all__ = ["DOWNLOADS", "check_what", "redirect_target", "save"]

DOWNLOADS = ("image", "semantic_map")


def check_what(what: str) -> None:
    if what not in DOWNLOADS:
        raise ValueError(f"what: one of {', '.join(DOWNLOADS)}, not {what!r}")


def redirect_target(r: httpx.Response, base: httpx.URL) -> tuple[httpx.URL, bool]:
    """Where a download redirect points, and whether it is the API's own origin (only
    then may the API key go along: a presigned storage URL carries its own
    authorization and must not learn the key)."""
    url = r.url.join(r.headers["location"])
    same = (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
    return url, same


def save(content: bytes, path: str | Path | None) -> bytes:
    if path is not None:
        Path(path).write_bytes(content)
    return content
