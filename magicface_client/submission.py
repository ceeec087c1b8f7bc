"""The request of POST /v1/jobs: multipart by default (the images as files, without
base64's third more), or JSON with the images inlined as data: URIs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from .models import Concept, check_concepts, image_bytes, image_kind

__all__ = ["submission", "held_timeout"]


def submission(prompt: str, concepts: Sequence[Concept], *, params: dict | None,
               webhook: str | None, webhook_events: Sequence[str] | None,
               idempotency_key: str | None, wait: int | None,
               cancel_after: str | float | None, json_body: bool) -> dict[str, Any]:
    """httpx keyword arguments (body and headers) of POST /v1/jobs."""
    check_concepts(concepts)
    headers = _headers(idempotency_key, wait, cancel_after)
    if isinstance(webhook_events, str):
        webhook_events = [e.strip() for e in webhook_events.split(",") if e.strip()]
    if json_body:
        body: dict[str, Any] = {"prompt": prompt, "concepts": [c.json_spec() for c in concepts]}
        if params:
            body["params"] = params
        if webhook:
            body["webhook"] = webhook
            if webhook_events:
                body["webhook_events"] = list(webhook_events)
        return {"json": body, "headers": headers}
    data = {"prompt": prompt, "concepts": json.dumps([c.spec() for c in concepts])}
    if params:
        data["params"] = json.dumps(params)
    if webhook:
        data["webhook"] = webhook
        if webhook_events:
            data["webhook_events"] = ",".join(webhook_events)
    return {"data": data, "files": _files(concepts), "headers": headers}


def _headers(idempotency_key: str | None, wait: int | None,
             cancel_after: str | float | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if wait is not None:
        headers["Prefer"] = f"wait={int(wait)}"
    if cancel_after is not None:
        headers["Cancel-After"] = (f"{cancel_after:g}" if isinstance(cancel_after, (int, float))
                                   else str(cancel_after))
    return headers


def _files(concepts: Sequence[Concept]) -> list[tuple[str, tuple[str, bytes, str]]]:
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    for field, images in (("images", [c.image for c in concepts]),
                          ("masks", [c.mask for c in concepts if c.mask is not None])):
        for i, image in enumerate(images):
            raw = image_bytes(image)
            mime, suffix = image_kind(raw)
            files.append((field, (f"{field[:-1]}{i}.{suffix}", raw, mime)))
    return files


def held_timeout(base: httpx.Timeout, wait: int | None) -> httpx.Timeout:
    """The read timeout of a submission the server may hold `wait` seconds (Prefer)."""
    if wait is None or base.read is None:
        return base
    return httpx.Timeout(connect=base.connect, read=base.read + wait, write=base.write,
                         pool=base.pool)
