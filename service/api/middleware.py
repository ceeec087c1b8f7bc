"""The gateway's outer layer (plain ASGI): request ids, the body limit counted as the
body streams in (never trusting Content-Length alone), a stalled-body timeout, and
the key guard on the API documents."""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException

from ..settings import Settings
from .deps import authorized_owner
from .request_ids import HEADER, new_request_id

__all__ = ["GatewayMiddleware", "BodyTooLarge", "BodyTimeout", "DOCS_PATHS"]

DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
# Multipart framing adds a little over the files themselves.
FRAMING_BYTES = 2**20


# The connection is closed after these answers: otherwise the server would go on
# reading (and discarding) the rest of a body nobody wants.
CLOSE = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit: reading stops there.
    (An HTTPException, so FastAPI's body parsing passes it on unchanged.)"""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the {limit}-byte limit", headers=CLOSE)


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stalled for {seconds:g} s", headers=CLOSE)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class GatewayMiddleware:
    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings
        # Job submissions are read, parsed and stored a few at a time: the rest wait in
        # the socket (TCP holds them back), and the event loop stays free to answer
        # probes and reads promptly.
        self.upload_slots = asyncio.Semaphore(settings.upload_concurrency)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings
        rid = new_request_id(_header(scope, HEADER.encode()))
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (HEADER.encode(), rid.encode())]}
            await send(message)

        header_bytes = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
        if header_bytes > s.max_header_bytes:
            return await _reply(send_with_id, 431, "headers_too_large",
                                f"request headers: {header_bytes} bytes, at most "
                                f"{s.max_header_bytes} (MAX_HEADER_BYTES)")
        if (scope["path"] in DOCS_PATHS and s.api_key_set and not s.public_docs
                and authorized_owner(s, _header(scope, b"authorization")) is None):
            return await _reply(send_with_id, 401, "unauthorized",
                                "Authorization: Bearer <API key> is required")
        limit = s.max_request_bytes + FRAMING_BYTES
        if (_header(scope, b"content-type") or "").lower().startswith("application/json"):
            limit = s.max_request_bytes * 4 // 3 + FRAMING_BYTES  # base64 data: URIs
        length = _header(scope, b"content-length")
        if length and length.isdigit() and int(length) > limit:
            return await _reply(send_with_id, 413, "request_too_large",
                                f"request body of {length} bytes is over the "
                                f"{s.max_request_bytes}-byte limit")
        received, done = 0, False

        async def counted_receive():
            nonlocal received, done
            if done:  # after the body: waiting for a disconnect, no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), s.body_timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(s.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > limit:
                    raise BodyTooLarge(s.max_request_bytes)
            return message

        if scope["method"] == "POST" and scope["path"] == "/v1/jobs":
            await self.upload_slots.acquire()
            held = [True]

            def release() -> None:  # once the job exists (Prefer: wait lets go early)
                if held[0]:
                    held[0] = False
                    self.upload_slots.release()

            scope["state"]["release_upload_slot"] = release
            try:
                return await self.app(scope, counted_receive, send_with_id)
            finally:
                release()
        await self.app(scope, counted_receive, send_with_id)


async def _reply(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
