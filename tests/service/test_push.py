"""Push over the real stack (gateway and worker processes, a real Redis): the SSE
stream resumes across a gateway restart with nothing lost or repeated; signed webhooks
arrive once each, through a receiver's failures; `Prefer: wait` both ways; the JSON
body and multipart make the same image; https URL inputs."""

from __future__ import annotations

import base64
import http.server
import io
import json
import ssl
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ..helpers.examples import trio_job
from ..helpers.stack import Stack

pytestmark = pytest.mark.slow  # real processes; runs in .ci/run (MAGICFACE_ALL_TESTS=1)

SMALL = {"steps": 4, "width": 64, "height": 64, "seed": 5}
MEDIUM = {"steps": 24, "width": 128, "height": 128, "seed": 5}
SECRET = "whsec_" + base64.b64encode(b"a-test-secret-of-32-bytes-length").decode()
# Unpadded (the standard allows it): the service and the reference library both read it.
OLD_SECRET = "whsec_" + base64.b64encode(b"the-retired-secret-key").decode().rstrip("=")


def sse(response):
    """(id, event, data) of each event of an SSE body, as it arrives."""
    fields = {}
    for line in response.iter_lines():
        if line == "":
            if "event" in fields:
                yield fields["id"], fields["event"], json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":") and ":" in line:
            k, _, v = line.partition(":")
            fields[k] = v.lstrip(" ")


def read_events(client: httpx.Client, job_id: str, last: str | None = None,
                stop_after: int | None = None) -> list[tuple[str, str, dict]]:
    headers = {"Last-Event-ID": last} if last else {}
    got = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                       timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "text/event-stream")
        for ev in sse(r):
            got.append(ev)
            if stop_after is not None and len(got) == stop_after:
                break
    return got


@pytest.fixture
def stack(redis_db, redis_server, tmp_path):
    s = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 'store'}",
               "WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}", "WEBHOOK_ALLOW_PRIVATE": "true",
               "WEBHOOK_BACKOFF_S": "0.3"}, tmp_path / "logs")
    s.start_gateway()
    yield s
    s.stop()


def test_event_stream_resumes_across_a_gateway_restart(stack):
    stack.start_worker()
    job = stack.submit_job(trio_job(1), MEDIUM)
    first = read_events(stack.client, job["id"], stop_after=4)
    assert [e[1] for e in first[:2]] == ["queued", "started"]
    assert first[2][1] == "progress" and first[2][2]["total"] == MEDIUM["steps"]
    # The gateway goes away mid-stream and comes back (events live in Redis).
    stack.gateway.terminate()
    stack.gateway.wait(timeout=10)
    stack.start_gateway()
    rest = read_events(stack.client, job["id"], last=first[-1][0])
    whole = read_events(stack.client, job["id"])
    assert first + rest == whole  # nothing lost, nothing repeated
    assert len({e[0] for e in whole}) == len(whole)
    assert whole[-1][1] == "succeeded" and whole[-1][2]["status"] == "succeeded"
    steps = [e[2]["step"] for e in whole if e[1] == "progress"]
    assert steps == sorted(steps) and steps[-1] == MEDIUM["steps"]
    progress = [e[2] for e in whole if e[1] == "progress"]
    assert all(p["stage"] in ("rsa", "rba") and p["eta_s"] >= 0 for p in progress)
    assert progress[-1]["percent"] == 100.0
    # Resuming after the terminal event: the stream ends at once, empty.
    assert read_events(stack.client, job["id"], last=whole[-1][0]) == []


class Receiver:
    """A local webhook endpoint that answers 500 to the first `fail` tries of each
    message of type `failing`."""

    def __init__(self, fail: int, failing: str = "job.succeeded"):
        self.requests: list[tuple[dict, bytes, int]] = []
        self.fail, self.failing = fail, failing
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                msg = self.headers["webhook-id"]
                tried = sum(1 for h, _, _ in outer.requests if h["webhook-id"] == msg)
                failing = json.loads(body)["type"] == outer.failing
                code = 500 if failing and tried < outer.fail else 204
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()},
                                       body, code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[tuple[dict, bytes, int]]:
        return [r for r in self.requests if r[2] == 204]


def test_webhooks_are_signed_and_arrive_once_through_failures(stack):
    from standardwebhooks.webhooks import Webhook

    receiver = Receiver(fail=3)
    stack.start_worker()
    r = stack.submit(**_form(trio_job(1)), params=SMALL,
                     data_extra={"webhook": receiver.url,
                                 "webhook_events": "queued,started,progress,succeeded"})
    assert r.status_code == 202, r.text
    job = r.json()
    done = stack.wait(job["id"])
    assert done["status"] == "succeeded"
    deadline = time.monotonic() + 60
    log_url = f"/v1/jobs/{job['id']}/webhook_deliveries"
    while time.monotonic() < deadline:
        log = stack.client.get(log_url).json()["deliveries"]
        if log and log[-1]["event"] == "succeeded" and all(
                d["status"] == "delivered" for d in log):
            break
        time.sleep(0.2)
    delivered = receiver.delivered()
    ids = [h["webhook-id"] for h, _, _ in delivered]
    assert len(ids) == len(set(ids))  # each event once
    types = [json.loads(b)["type"] for _, b, _ in delivered]
    assert {"job.queued", "job.started", "job.progress", "job.succeeded"} <= set(types)
    # The succeeded event failed three times, then arrived under the same webhook-id.
    first = next(h["webhook-id"] for h, b, _ in receiver.requests if b"job.succeeded" in b)
    tries = [code for h, _, code in receiver.requests if h["webhook-id"] == first]
    assert tries == [500, 500, 500, 204]
    # Signed the Standard Webhooks way: their reference library verifies every one,
    # with either secret of the rotation.
    for headers, body, _ in delivered:
        payload = Webhook(SECRET).verify(body, headers)
        assert payload["data"] and payload["type"].startswith("job.")
        assert len(headers["webhook-signature"].split(" ")) == 2
        Webhook(OLD_SECRET).verify(body, headers)
    final = json.loads([b for _, b, _ in delivered if b"job.succeeded" in b][0])
    assert final["data"]["id"] == job["id"] and final["data"]["status"] == "succeeded"
    # The delivery log says so; a redelivery sends the same message again.
    log = stack.client.get(log_url).json()["deliveries"]
    assert all(d["status"] == "delivered" for d in log)
    assert {d["id"]: d["attempts"] for d in log}[first] == 4
    assert all(d["last_status_code"] == 204 for d in log)
    assert sorted(d["id"] for d in log) == sorted(ids)
    n = len(receiver.requests)
    r = stack.client.post(f"/v1/jobs/{job['id']}/webhook_deliveries/{log[-1]['id']}/redeliver")
    assert r.status_code == 202 and r.json()["status"] == "pending"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(receiver.requests) == n:
        time.sleep(0.1)
    assert receiver.requests[-1][0]["webhook-id"] == log[-1]["id"]


def _form(job: dict) -> dict:
    return {"prompt": job["prompt"], "concepts": job["concepts"], "images": job["images"],
            "masks": job["masks"]}


def test_prefer_wait_both_ways(stack):
    # No worker yet: the wait runs out and the answer is the usual 202.
    t = time.monotonic()
    r = stack.submit(**_form(trio_job(1)), params=SMALL, headers={"Prefer": "wait=1"})
    assert r.status_code == 202 and time.monotonic() - t >= 1
    assert r.json()["status"] == "queued" and r.headers["preference-applied"] == "wait=1"
    stack.start_worker()
    stack.wait(r.json()["id"])
    r = stack.submit(**_form(trio_job(1)), params={**SMALL, "seed": 6},
                     headers={"Prefer": "wait=60"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "succeeded" and r.json()["result"]["image_url"]
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"


def _data_uri(path_or_bytes) -> str:
    data = Path(path_or_bytes).read_bytes() if not isinstance(path_or_bytes, bytes) \
        else path_or_bytes
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_json_body_makes_the_same_image_as_multipart(stack):
    stack.start_worker()
    job = trio_job(2)
    a = stack.submit_job(job, SMALL)
    body = {"prompt": job["prompt"], "params": SMALL,
            "concepts": [{**c, "image": _data_uri(i), "mask": _data_uri(m)}
                         for c, i, m in zip(job["concepts"], job["images"], job["masks"],
                                            strict=True)]}
    r = stack.client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    b = r.json()
    views = [stack.wait(j["id"]) for j in (a, b)]
    assert all(v["status"] == "succeeded" for v in views)
    imgs = [stack.client.get(f"/v1/jobs/{j['id']}/image").content for j in (a, b)]
    assert imgs[0][:4] == imgs[1][:4] == b"\x89PNG"
    # The same inputs (the hashes below), so the same image; a worker may sample the
    # two jobs together (BATCH_MAX), which changes only the float order.
    pixels = [np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16) for x in imgs]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    ra, rb = (v["reproducibility"] for v in views)
    assert ra["input_sha256"] == rb["input_sha256"] and len(ra["input_sha256"]) == 4
    assert ra["seed"] == SMALL["seed"] and ra["preset"] == "authors"
    assert ra["params"]["ca_scale"] == 0.6 and ra["weights_sha256"] == rb["weights_sha256"]
    assert len(ra["weights_sha256"]) == 64 and ra["library_version"]
    assert {"load", "sample", "store"} <= set(ra["timings_s"]) and ra["duration_s"] > 0
    legend = views[0]["result"]["semantic_map_legend"]
    assert [e["word"] for e in legend] == [c["word"] for c in job["concepts"]]
    assert all(len(e["color"]) == 7 and e["color"].startswith("#") for e in legend)


def test_https_url_inputs_from_an_allowed_host(redis_db, redis_server, tmp_path):
    """The gateway fetches https inputs itself: a local TLS server (a test CA) on an
    allow-listed host name; other hosts and private addresses are refused."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    job = trio_job(1)
    files = {"/face.png": Path(job["images"][0]).read_bytes(),
             "/mask.png": Path(job["masks"][0]).read_bytes()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/jump":
                self.send_response(302)
                self.send_header("Location", "https://127.0.0.1:1/face.png")
                self.end_headers()
                return
            data = files.get(self.path)
            self.send_response(200 if data else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"https://localhost:{server.server_port}"
    s = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 'store'}",
               "INPUT_URL_ALLOWLIST": "localhost", "INPUT_URL_ALLOW_PRIVATE": "true",
               "SSL_CERT_FILE": str(ca_file)}, tmp_path / "logs")
    s.start_gateway()
    try:
        concept = job["concepts"][0]
        ok = s.client.post("/v1/jobs", json={
            "prompt": job["prompt"], "params": SMALL,
            "concepts": [{**concept, "image": f"{base}/face.png", "mask": f"{base}/mask.png"}]})
        assert ok.status_code == 202, ok.text
        stored = tmp_path / "store" / "jobs" / ok.json()["id"] / "input"
        assert (stored / "image_0").read_bytes() == files["/face.png"]
        for url, message in ((f"{base}/missing.png", "HTTP 404"),
                             (f"{base}/jump", "host 127.0.0.1 is not in the allowed list"),
                             (f"https://127.0.0.1:{server.server_port}/face.png",
                              "not in the allowed list"),
                             (f"http://localhost:{server.server_port}/face.png",
                              "scheme must be https")):
            r = s.client.post("/v1/jobs", json={
                "prompt": job["prompt"],
                "concepts": [{**concept, "image": url, "mask": f"{base}/mask.png"}]})
            assert r.status_code == 422, r.text
            assert "concepts[0].image" in r.json()["error"]["message"]
            assert message in r.json()["error"]["message"], r.text
    finally:
        s.stop()
        server.shutdown()
