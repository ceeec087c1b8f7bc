"""magicface_client against the real stack (gateway and worker processes, a real Redis):
submit both ways, wait over the event stream with progress, download (directly, and
through presigned S3 URLs that must not see the API key), cancel, list, delete, keys,
resumed events, a stream cut mid-way and one refused (through a real TCP proxy in front
of the gateway), the async client, and webhook verification against the Standard
Webhooks reference library."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from datetime import datetime, timezone

import pytest
from PIL import Image

from magicface_client import (
    AsyncClient,
    Client,
    Concept,
    JobFailed,
    MagicFaceError,
    WebhookVerificationError,
    verify_webhook,
)
from service.webhooks import secret_bytes, signature_header

from ..helpers.examples import trio_job
from ..helpers.stack import Stack

SMALL = {"steps": 4, "width": 64, "height": 64, "seed": 2}
# Slow enough on a CPU to be caught running.
LONG = {"steps": 100, "width": 256, "height": 256, "seed": 2}
KEY = "client-key"
pytestmark = pytest.mark.slow


def concepts(n: int = 1) -> tuple[str, list[Concept]]:
    job = trio_job(n)
    return job["prompt"], [Concept(c["word"], img, mask=m, weight=c["weight"],
                                   reference_prompt=c["reference_prompt"])
                           for c, img, m in zip(job["concepts"], job["images"], job["masks"],
                                                strict=True)]


def png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.size


def start_stack(env: dict[str, str], logs) -> Stack:
    s = Stack({**env, "API_KEYS": KEY}, logs)
    s.start_gateway()
    s.client.headers["Authorization"] = f"Bearer {KEY}"
    s.start_worker()
    return s


@pytest.fixture
def stack(redis_db, redis_server, tmp_path):
    s = start_stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 'store'}"},
                    tmp_path / "logs")
    yield s
    s.stop()


@pytest.fixture
def s3_stack(redis_db, redis_server, s3_endpoint, tmp_path):
    """A stack on S3 (moto) whose downloads redirect to presigned URLs of a public
    endpoint: a proxy in front of moto that records what reaches it."""
    public = FaultyProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    s = start_stack({"REDIS_URL": redis_server,
                     "STORAGE_URL": f"s3://client-{int(time.time() * 1000)}/runs",
                     "S3_ENDPOINT_URL": s3_endpoint, "S3_PUBLIC_URL": public.url,
                     "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                    tmp_path / "logs")
    s.public_storage = public
    yield s
    s.stop()
    public.close()


class FaultyProxy:
    """A TCP proxy in front of the gateway that fails event streams the way networks do:
    while `cuts` > 0, a response is cut off right after its first complete progress event
    (the connection drops mid-stream); with `refuse_events`, event-stream requests get a
    502 (a proxy that does not pass server-sent events). Everything else passes as is.
    `heads` records every request's head (request line and headers)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.cuts = 0
        self.refuse_events = False
        self.heads: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def event_requests(self) -> list[str]:
        return [h for h in self.heads if h.split(" ", 2)[1].endswith("/events")]

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._requests, args=(conn, up), daemon=True).start()
            threading.Thread(target=self._responses, args=(up, conn), daemon=True).start()

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _requests(self, conn: socket.socket, up: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
                line = head.split("\r\n", 1)[0]
                if line.endswith(" HTTP/1.1"):  # a request's start, not a body's part
                    self.heads.append(head)
                    if self.refuse_events and line.split(" ")[1].endswith("/events"):
                        conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\n"
                                     b"content-length: 11\r\nconnection: close\r\n\r\n"
                                     b"bad gateway")
                        return
                up.sendall(data)
        except OSError:
            pass
        finally:
            self._close(conn, up)

    def _responses(self, up: socket.socket, conn: socket.socket) -> None:
        seen = b""
        try:
            while data := up.recv(65536):
                if self.cuts > 0:
                    seen += data
                    at = seen.find(b"event: progress")
                    end = seen.find(b"\n\n", at) if at >= 0 else -1
                    if end >= 0:  # forward up to the end of that event, then drop
                        self.cuts -= 1
                        conn.sendall(data[:len(data) - (len(seen) - end - 2)])
                        return
                conn.sendall(data)
        except OSError:
            pass
        finally:
            self._close(conn, up)


def test_submit_wait_download_cancel_list_delete(stack):
    prompt, cs = concepts(1)
    with Client(stack.base_url, api_key=KEY) as c:
        seen = []
        job = c.submit(prompt, cs, params=SMALL)
        assert job.status in ("queued", "running") and job.progress["total"] == 4
        done = c.wait(job.id, on_progress=seen.append, timeout=120)
        assert done.status == "succeeded" and done.result["image_url"] == \
            f"/v1/jobs/{job.id}/image"
        steps = [p["step"] for p in seen]
        assert steps == sorted(steps) and len(set(steps)) >= 2, seen
        assert seen[-1]["step"] == 4 and seen[-1]["percent"] == 100.0
        png = c.download(job.id)
        assert png_size(png) == (64, 64)
        assert png_size(c.download(job.id, what="semantic_map")) == (64, 64)
        # The JSON body (data: URIs) carries the same bytes and makes a job that succeeds.
        # Prefer: wait holds the answer until the job ends (unless it takes over 30 s on a
        # loaded machine); the same Idempotency-Key and body give the same job back;
        # Cancel-After sets its deadline.
        other = c.submit(prompt, cs, params=SMALL, json_body=True, wait=30,
                         idempotency_key="k-1", cancel_after="5m")
        if not other.done:
            other = c.wait(other.id, timeout=120)
        assert other.status == "succeeded" and other.raw["deadline"] is not None
        assert png_size(c.download(other.id)) == (64, 64)
        assert (other.raw["reproducibility"]["input_sha256"]
                == done.raw["reproducibility"]["input_sha256"])
        again = c.submit(prompt, cs, params=SMALL, json_body=True, idempotency_key="k-1",
                         cancel_after=300)
        assert again.id == other.id
        # A running job: wait gives up at its timeout; once canceled, wait raises
        # JobFailed carrying the final view.
        long = c.submit(prompt, cs, params=LONG)
        deadline = time.monotonic() + 60
        while c.get(long.id).status != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            c.wait(long.id, timeout=1)
        assert time.monotonic() - t0 < 5
        assert c.cancel(long.id).status in ("cancel_requested", "canceled")
        with pytest.raises(JobFailed) as failed:
            c.wait(long.id, timeout=60)
        assert failed.value.job.status == "canceled" and failed.value.job.error["code"]
        with pytest.raises(MagicFaceError) as e:
            c.download(long.id)
        assert e.value.status == 410
        # Newest first, across pages of 2.
        assert [j.id for j in c.list(limit=2)] == [long.id, other.id, job.id]
        assert [j.id for j in c.list(status="canceled")] == [long.id]
        c.delete(other.id)
        with pytest.raises(MagicFaceError) as e:
            c.get(other.id)
        assert (e.value.status, e.value.code) == (404, "not_found")
        with pytest.raises(ValueError, match="mask"):  # refused before any upload
            c.submit(prompt, [cs[0], Concept("x", cs[0].image)])
    with Client(stack.base_url) as anonymous, pytest.raises(MagicFaceError) as e:
        anonymous.get(job.id)
    assert (e.value.status, e.value.code) == (401, "unauthorized")


def test_async_client_presigned_downloads_resumed_cut_and_refused_event_streams(
        s3_stack, tmp_path):
    stack = s3_stack
    prompt, cs = concepts(1)

    async def run_async() -> str:
        async with AsyncClient(stack.base_url, api_key=KEY) as c:
            job = await c.submit(prompt, cs, params=SMALL)
            progress = []
            done = await c.wait(job.id, on_progress=progress.append, timeout=120)
            assert done.status == "succeeded" and progress[-1]["percent"] == 100.0
            await c.download(job.id, tmp_path / "async.png")
            assert [j.id async for j in c.list()] == [job.id]
            return job.id

    job_id = asyncio.run(run_async())
    assert png_size((tmp_path / "async.png").read_bytes()) == (64, 64)

    proxy = FaultyProxy(stack.port)
    try:
        with Client(stack.base_url, api_key=KEY) as c, \
                Client(proxy.url, api_key=KEY) as via_proxy:
            every = list(c.events(job_id))
            # queued and started once each (in either order: the gateway appends queued
            # after enqueuing, so an idle worker may append started first), progress, and
            # the end, as (id, type, data) tuples.
            types = [t for _, t, _ in every]
            assert types.count("queued") == types.count("started") == 1, types
            assert set(types[:-1]) == {"queued", "started", "progress"}, types
            assert every[-1].type == "succeeded" and every[-1].data["id"] == job_id
            # Resumed after an id: exactly the events after it.
            after = list(c.events(job_id, last_event_id=every[1].id))
            assert after == every[2:]

            # A stream dropped mid-way is reopened with Last-Event-ID: no event is lost
            # or repeated.
            proxy.cuts = 1
            live = c.submit(prompt, cs, params={**SMALL, "steps": 8, "seed": 5})
            followed = list(via_proxy.events(live.id))
            assert proxy.cuts == 0 and len(proxy.event_requests) == 2
            first_progress = next(e for e in followed if e.type == "progress")
            assert f"last-event-id: {first_progress.id}" in proxy.event_requests[1].lower()
            assert followed == list(c.events(live.id))
            assert followed[-1].type == "succeeded"

            # A proxy that refuses the stream: wait polls instead; run = submit, wait,
            # download.
            proxy.refuse_events = True
            seen = []
            png = via_proxy.run(prompt, cs, tmp_path / "polled.png",
                                params={**SMALL, "seed": 6}, on_progress=seen.append,
                                timeout=120)
            assert len(proxy.event_requests) == 3
            assert png_size(png) == (64, 64) and (tmp_path / "polled.png").read_bytes() == png
            assert seen and seen[-1]["percent"] == 100.0
    finally:
        proxy.close()
    # Both downloads were redirected to presigned storage URLs, fetched without the key.
    storage_requests = stack.public_storage.heads
    assert len(storage_requests) == 2 and all("Signature=" in h.split("\r\n")[0]
                                               for h in storage_requests), storage_requests
    assert not any("authorization:" in h.lower() for h in storage_requests)


def _service_signed(secret: str, body: bytes, msg_id: str = "msg_1",
                    ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": signature_header([secret_bytes(secret)], msg_id, ts, body)}


def test_verify_webhook_against_the_reference_library_and_the_service():
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    old_secret = "whsec_" + base64.b64encode(b"a-retired-key-of-24-byte").decode()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "x"}}).encode()
    ts = int(time.time())
    # Signed by the reference library; headers in any case.
    sig = Webhook(secret).sign("msg_2", datetime.fromtimestamp(ts, tz=timezone.utc),
                               body.decode())
    headers = {"Webhook-Id": "msg_2", "Webhook-Timestamp": str(ts), "Webhook-Signature": sig}
    assert verify_webhook(body, headers, secret) == json.loads(body)
    # Signed by the service: the second of two secrets matches (a rotation), and a
    # delivery signed with both keys passes either receiver.
    assert verify_webhook(body, _service_signed(secret, body),
                          [old_secret, secret])["data"] == {"id": "x"}
    both = {"webhook-id": "m", "webhook-timestamp": str(ts),
            "webhook-signature": signature_header(
                [secret_bytes(old_secret), secret_bytes(secret)], "m", ts, body)}
    assert verify_webhook(body, both, secret) and verify_webhook(body, both, old_secret)
    with pytest.raises(ValueError, match="whsec_"):
        verify_webhook(body, _service_signed(secret, body), "plain-text")
    assert verify_webhook(body.decode(), _service_signed(secret, body), secret)
    # The reference library accepts what the service signs.
    assert Webhook(secret).verify(body, _service_signed(secret, body)) == json.loads(body)
    wrong = "whsec_" + base64.b64encode(b"another-key-of-24-bytes!").decode()
    for bad_body, bad_headers, key in (
            (body + b" ", _service_signed(secret, body), secret),  # tampered
            (body, _service_signed(secret, body), wrong),  # wrong secret
            (body, _service_signed(secret, body), [wrong, old_secret]),
            (body, _service_signed(secret, body, ts=int(time.time()) - 600), secret),  # old
            (body, _service_signed(secret, body, ts=int(time.time()) + 600), secret),
            (body, {**_service_signed(secret, body), "webhook-id": "msg_9"}, secret),
            (body, {"webhook-id": "m", "webhook-timestamp": str(ts)}, secret),  # unsigned
            (body, {**_service_signed(secret, body), "webhook-signature": "v1,@@"}, secret)):
        with pytest.raises(WebhookVerificationError):
            verify_webhook(bad_body, bad_headers, key)
    # A wider tolerance accepts the old delivery.
    stale = _service_signed(secret, body, ts=int(time.time()) - 600)
    assert verify_webhook(body, stale, secret, tolerance_s=900)
