"""magicface_client against the real stack (gateway and worker processes, a real
Redis): submit both ways, wait over the event stream with progress, download, cancel,
list, delete, keys, resumed events, the async client, and webhook verification
against the Standard Webhooks reference library."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

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
LONG = {"steps": 100, "width": 256, "height": 256, "seed": 2}
pytestmark = pytest.mark.slow


def concepts(n: int = 1) -> tuple[str, list[Concept]]:
    job = trio_job(n)
    return job["prompt"], [Concept(c["word"], img, mask=m, weight=c["weight"])
                           for c, img, m in zip(job["concepts"], job["images"], job["masks"],
                                                strict=True)]


@pytest.fixture
def stack(redis_db, redis_server, tmp_path):
    s = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 'store'}",
               "API_KEYS": "client-key"}, tmp_path / "logs")
    s.start_gateway()
    s.client.headers["Authorization"] = "Bearer client-key"
    s.start_worker()
    yield s
    s.stop()


def test_submit_wait_download_list_cancel_delete(stack):
    prompt, cs = concepts(1)
    with Client(stack.base_url, api_key="client-key") as c:
        seen = []
        job = c.submit(prompt, cs, params=SMALL)
        assert job.status in ("queued", "running")
        done = c.wait(job.id, on_progress=seen.append, timeout=120)
        assert done.status == "succeeded" and done.result["image_url"]
        steps = [p["step"] for p in seen]
        assert steps == sorted(steps) and seen[-1]["percent"] == 100.0
        png = c.download(job.id)
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        # The JSON body (data: URIs) makes the same image.
        other = c.submit(prompt, cs, params=SMALL, json_body=True)
        c.wait(other.id)
        assert c.download(other.id) == png
        # A canceled job: wait raises JobFailed carrying the final view.
        long = c.submit(prompt, cs, params=LONG)
        deadline = time.monotonic() + 60
        while c.get(long.id).status != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.cancel(long.id).status in ("cancel_requested", "canceled")
        with pytest.raises(JobFailed) as e:
            c.wait(long.id, timeout=60)
        assert e.value.job.status == "canceled"
        ids = [j.id for j in c.list(limit=2)]
        assert ids == [long.id, other.id, job.id]
        c.delete(other.id)
        with pytest.raises(MagicFaceError) as e:
            c.get(other.id)
        assert e.value.status == 404 and e.value.code == "not_found"
    with Client(stack.base_url) as anonymous, pytest.raises(MagicFaceError) as e:
        anonymous.get(job.id)
    assert (e.value.status, e.value.code) == (401, "unauthorized")


def test_events_resume_after_an_id_and_the_async_client(stack, tmp_path):
    prompt, cs = concepts(1)

    async def go():
        async with AsyncClient(stack.base_url, api_key="client-key") as c:
            job = await c.submit(prompt, cs, params=SMALL)
            done = await c.wait(job.id, timeout=120)
            assert done.status == "succeeded"
            await c.download(job.id, tmp_path / "out.png")
            return job.id

    job_id = asyncio.run(go())
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    with Client(stack.base_url, api_key="client-key") as c:
        every = list(c.events(job_id))
        assert every[0].type == "queued" and every[-1].type == "succeeded"
        after = list(c.events(job_id, last_event_id=every[1].id))
        assert [e.id for e in after] == [e.id for e in every[2:]]


def _signed(secret: str, body: bytes, msg_id="msg_1", ts=None) -> dict:
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": signature_header([secret_bytes(secret)], msg_id, ts, body)}


def test_verify_webhook_matches_the_reference_library():
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "x"}}).encode()
    ts = int(time.time())
    # Signed by the reference library.
    from datetime import datetime, timezone

    sig = Webhook(secret).sign("msg_2", datetime.fromtimestamp(ts, tz=timezone.utc), body.decode())
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(ts), "webhook-signature": sig}
    assert verify_webhook(body, headers, secret)["type"] == "job.succeeded"
    # Signed by the service; the second secret of a rotation matches.
    assert verify_webhook(body, _signed(secret, body), ["whsec_" + base64.b64encode(
        b"old").decode(), secret])["data"] == {"id": "x"}
    assert verify_webhook(body, _signed("plain-text", body), "plain-text")
    for bad_body, headers, key in (
            (body + b" ", _signed(secret, body), secret),  # tampered
            (body, _signed(secret, body), "whsec_" + base64.b64encode(b"other").decode()),
            (body, _signed(secret, body, ts=int(time.time()) - 3600), secret),  # old
            (body, {"webhook-id": "m"}, secret)):
        with pytest.raises(WebhookVerificationError):
            verify_webhook(bad_body, headers, key)
