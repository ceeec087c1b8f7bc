"""The fault battery, over the real stack (gateway and worker processes, a Redis and an
S3 of the test's own): outages, races, retention, hostile bodies, load on the probe,
dead workers. Marked slow: `./scripts/test.sh` runs them with everything else."""

from __future__ import annotations

import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from ..helpers.examples import trio_job
from ..helpers.multipart import job_form
from ..helpers.stack import OwnRedis, OwnS3, Stack

pytestmark = pytest.mark.slow

SMALL = {"steps": 3, "width": 128, "height": 128, "seed": 5}
MID = {"steps": 40, "width": 448, "height": 448, "seed": 3}  # ~25 s on a 2-core CPU
LONG = {"steps": 100, "width": 448, "height": 448, "seed": 3}
FAST_WORKER = {"WORKER_HEARTBEAT_TTL_S": "4", "WORKER_MAINTENANCE_INTERVAL_S": "2"}


@pytest.fixture
def own_redis(tmp_path):
    r = OwnRedis(tmp_path / "redis")
    r.start()
    yield r
    r.stop()


def stack_for(tmp_path, name: str, **env) -> Stack:
    return Stack({k: str(v) for k, v in env.items()}, tmp_path / f"logs-{name}")


def test_redis_stopped_mid_job(own_redis, tmp_path):
    """Redis down for 10 s while a job runs: the job finishes (its end recorded once
    Redis is back), the worker lives on, and the next job runs."""
    stack = stack_for(tmp_path, "redis", REDIS_URL=own_redis.url,
                      STORAGE_URL=f"file://{tmp_path / 'store'}", REDIS_RETRY_S=120,
                      **FAST_WORKER)
    try:
        stack.start_gateway()
        worker = stack.start_worker()
        job = stack.submit_job(trio_job(2), MID)
        stack.wait(job["id"], ("running",), min_step=2, timeout=120)
        own_redis.stop()
        time.sleep(10)
        own_redis.start()
        done = stack.wait(job["id"], timeout=180)
        print(f"Redis down 10 s mid-job: the job ended {done['status']}")
        assert done["status"] == "succeeded", (done, stack.log("worker0"))
        assert worker.poll() is None, "the worker died in the outage"
        after = stack.wait(stack.submit_job(trio_job(1), SMALL)["id"], timeout=120)
        assert after["status"] == "succeeded"
    finally:
        stack.stop()


def test_storage_stopped_while_jobs_wait(redis_db, redis_server, tmp_path):
    """S3 down for 10 s with jobs queued and running: they wait and succeed."""
    s3 = OwnS3()
    s3.start()
    env = {"REDIS_URL": redis_server, "STORAGE_URL": "s3://outage-test",
           "S3_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "STORAGE_RETRY_S": 60, **FAST_WORKER}
    stack = stack_for(tmp_path, "s3", **env)
    try:
        stack.start_gateway()
        stack.start_worker()
        jobs = [stack.submit_job(trio_job(1), SMALL) for _ in range(3)]
        s3.stop()
        down_at = time.monotonic()
        time.sleep(10)
        s3.start()
        views = [stack.wait(j["id"], timeout=120) for j in jobs]
        assert [v["status"] for v in views] == ["succeeded"] * 3, stack.log("worker0")
        print(f"S3 down 10 s: 3 jobs succeeded {time.monotonic() - down_at:.1f} s after it "
              "went down")
        assert time.monotonic() - down_at >= 10
        assert stack.client.get(f"/v1/jobs/{jobs[0]['id']}/image").status_code == 200
    finally:
        stack.stop()
        s3.stop()


def test_two_gateways_racing_one_idempotency_key(redis_db, redis_server, s3_endpoint, tmp_path):
    """Concurrent POSTs with one key through two gateways on S3: one job, never a 404;
    another key's owner sees nothing of it."""
    env = {"REDIS_URL": redis_server, "STORAGE_URL": "s3://race-test",
           "S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "API_KEYS": "alpha,beta"}
    gateways = [stack_for(tmp_path, f"gw{i}", **env) for i in range(2)]
    for g in gateways:
        g.start_gateway()
    job = trio_job(2)
    form = job_form(job["prompt"], job["concepts"], job["images"], job["masks"], SMALL)
    headers = {"Authorization": "Bearer alpha", "Idempotency-Key": "race-1"}
    try:
        def post(i: int) -> httpx.Response:
            return gateways[i % 2].client.post("/v1/jobs", **form, headers=headers)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(post, range(60)))
        statuses = sorted({r.status_code for r in answers})
        assert statuses == [202], [r.text for r in answers if r.status_code != 202][:3]
        ids = {r.json()["id"] for r in answers}
        assert len(ids) == 1
        print("60 POSTs, one Idempotency-Key, two gateways: all 202, one job")
        (job_id,) = ids
        other = {"Authorization": "Bearer beta"}
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/image"):
            assert gateways[0].client.get(path, headers=other).status_code == 404
        assert gateways[1].client.post(f"/v1/jobs/{job_id}/cancel",
                                       headers=other).status_code == 404
        # Only the winner's objects are left in the bucket.
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="race-test").get("Contents", [])]
        assert keys and all(k.startswith(f"jobs/{job_id}/") for k in keys)
    finally:
        for g in gateways:
            g.stop()


def test_nothing_of_a_job_is_left_after_its_ttl(redis_db, redis_server, tmp_path):
    store = tmp_path / "store"
    stack = stack_for(tmp_path, "ttl", REDIS_URL=redis_server, STORAGE_URL=f"file://{store}",
                      RESULT_TTL_S=8, SWEEP_INTERVAL_S=3, **FAST_WORKER)  # grace: 1 h
    try:
        stack.start_gateway()
        stack.start_worker()
        job = stack.wait(stack.submit_job(trio_job(2), SMALL)["id"], timeout=120)
        assert job["status"] == "succeeded"
        job_dir = store / "jobs" / job["id"]
        # Inputs go when the job ends; the outputs stay while the record lives.
        assert not (job_dir / "input").exists() and (job_dir / "output" / "image.png").exists()
        ended = time.monotonic()
        # RESULT_TTL_S + SWEEP_INTERVAL_S + one sweep, and slack for a busy machine.
        deadline = ended + 8 + 3 + 3 + 6
        from service.jobs import events
        from service.keys import OWNER_JOBS_KEY, RETENTION_KEY

        while time.monotonic() < deadline and (
                job_dir.exists() or redis_db.zcard(RETENTION_KEY)):
            time.sleep(0.5)
        gone_after = time.monotonic() - ended
        assert not job_dir.exists(), sorted(p.name for p in job_dir.rglob("*"))
        print(f"RESULT_TTL_S=8, SWEEP_INTERVAL_S=3: the job's objects were gone "
              f"{gone_after:.1f} s after it succeeded")
        assert stack.client.get(f"/v1/jobs/{job['id']}").status_code == 404
        left = [k for k in (f"rq:job:{job['id']}", events.events_key(job["id"]))
                if redis_db.exists(k)]
        assert left == [], left
        assert redis_db.zcard(RETENTION_KEY) == 0
        assert redis_db.zscore(OWNER_JOBS_KEY.format("public"), job["id"]) is None
        assert redis_db.ttl(OWNER_JOBS_KEY.format("public")) in (-2, *range(1, 10**7))
    finally:
        stack.stop()


def send_chunked(port: int, total: int, spool, chunk: int = 2**20) -> tuple[int, int, bytes]:
    """POST `total` bytes, chunked (no Content-Length), over a raw socket until the
    server stops taking them. Returns (bytes the socket accepted, the largest size the
    gateway's spool folder reached, the start of the response)."""
    import socket

    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    part = (b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    data = b"\0" * chunk
    sent = peak = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        try:
            while sent < total:
                sock.sendall(f"{chunk:x}\r\n".encode() + data + b"\r\n")
                sent += chunk
                peak = max(peak, sum(p.stat().st_size for p in spool.rglob("*") if p.is_file()))
        except OSError:  # the gateway answered and closed: no more is taken
            pass
        try:
            reply = sock.recv(4096)
        except OSError:
            reply = b""
    return sent, peak, reply


def test_a_huge_chunked_body_stops_at_the_limit(redis_db, redis_server, tmp_path):
    """1 GiB, chunked (no Content-Length): refused at the limit, nothing spooled past it."""
    spool = tmp_path / "spool"
    spool.mkdir()
    limit = 4 * 2**20
    stack = stack_for(tmp_path, "body", REDIS_URL=redis_server,
                      STORAGE_URL=f"file://{tmp_path / 'store'}", MAX_REQUEST_BYTES=limit,
                      TMPDIR=spool)
    try:
        stack.start_gateway()
        started = time.monotonic()
        sent, peak, reply = send_chunked(stack.port, 2**30, spool)
        print(f"1 GiB chunked body: the socket took {sent / 2**20:.0f} MiB, the spool "
              f"peaked at {peak / 2**20:.1f} MiB, {time.monotonic() - started:.1f} s")
        # Socket buffers hold a few MiB past the point where the gateway stopped reading.
        assert sent <= limit + 32 * 2**20
        assert peak <= limit + 2 * 2**20
        assert reply == b"" or reply.startswith(b"HTTP/1.1 413")
        assert stack.client.get("/healthz").status_code == 200
    finally:
        stack.stop()


PROBE = """
import json, os, sys, time
import httpx
url, out, stop = sys.argv[1:4]
latencies = []
with httpx.Client(timeout=10) as client:
    while not os.path.exists(stop):
        t = time.perf_counter()
        assert client.get(url).status_code == 200
        latencies.append(time.perf_counter() - t)
        time.sleep(0.01)
json.dump(latencies, open(out, "w"))
"""


def test_healthz_stays_fast_under_uploads(redis_db, redis_server, tmp_path):
    """/healthz stays answered while 50 uploads run against a warm gateway (measured
    from a process of its own): before uploads moved off the event loop a probe waited
    up to 858 ms. The bound (p99 < 200 ms) catches that regression; it is not a speed
    figure: on this 2-core machine p99 ranges 36-81 ms from run to run, the same for
    the code before and after a change, so a tighter bound measures the machine."""
    import json
    import subprocess
    import sys

    stack = stack_for(tmp_path, "load", REDIS_URL=redis_server,
                      STORAGE_URL=f"file://{tmp_path / 'store'}")
    # A phone photo's worth: a 1024 x 1024 JPEG (about 0.8 MB of noise) and its mask.
    rng = np.random.default_rng(0)
    photo, mask = tmp_path / "photo.jpg", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(photo,
                                                                                quality=90)
    Image.new("L", (1024, 1024), 255).save(mask)
    job = trio_job(1)
    form = job_form(job["prompt"], job["concepts"], [photo], [mask], SMALL)
    out, stop = tmp_path / "latencies.json", tmp_path / "stop"
    try:
        stack.start_gateway()
        prober = subprocess.Popen([sys.executable, "-c", PROBE, f"{stack.base_url}/healthz",
                                   str(out), str(stop)])
        time.sleep(1)
        # The body is encoded once: the load generator should not be what is slow.
        encoded = httpx.Request("POST", f"{stack.base_url}/v1/jobs", **form)
        body, headers = encoded.read(), dict(encoded.headers)
        # One request first: the measurement is of a warm gateway.
        httpx.post(f"{stack.base_url}/v1/jobs", content=body, headers=headers, timeout=60)
        with ThreadPoolExecutor(50) as pool:
            codes = list(pool.map(
                lambda _: httpx.post(f"{stack.base_url}/v1/jobs", content=body,
                                     headers=headers, timeout=120).status_code, range(50)))
        stop.touch()
        prober.wait(timeout=30)
        latencies = json.loads(out.read_text())
        assert codes == [202] * 50
        ordered = sorted(latencies)
        p95, p99 = (ordered[int(q * (len(ordered) - 1))] for q in (0.95, 0.99))
        print(f"healthz under 50 uploads: n={len(latencies)} median="
              f"{statistics.median(latencies) * 1000:.1f} ms p95={p95 * 1000:.1f} ms "
              f"p99={p99 * 1000:.1f} ms")
        assert len(latencies) > 20 and p99 < 0.200
    finally:
        stop.touch()
        stack.stop()


def test_a_dead_workers_job_fails_while_the_other_worker_is_busy(redis_db, redis_server,
                                                                 tmp_path):
    stack = stack_for(tmp_path, "reap", REDIS_URL=redis_server,
                      STORAGE_URL=f"file://{tmp_path / 'store'}", **FAST_WORKER)
    try:
        stack.start_gateway()
        first = stack.start_worker()
        victim = stack.submit_job(trio_job(1), LONG)
        stack.wait(victim["id"], ("running",), min_step=1, timeout=120)
        stack.start_worker()
        busy = stack.submit_job(trio_job(1), LONG)
        stack.wait(busy["id"], ("running",), min_step=1, timeout=120)
        stack.kill_worker(first)
        killed = time.monotonic()
        done = stack.wait(victim["id"], ("failed",), timeout=4 + 10 + 5)
        assert done["error"]["code"] == "worker_lost"
        print(f"dead worker's job failed worker_lost {time.monotonic() - killed:.1f} s after "
              "the SIGKILL, the other worker busy")
        assert time.monotonic() - killed <= 4 + 10
        assert stack.client.get(f"/v1/jobs/{busy['id']}").json()["status"] == "running"
        stack.client.post(f"/v1/jobs/{busy['id']}/cancel")
    finally:
        stack.stop()


def test_a_cold_shutdown_is_worker_lost(redis_db, redis_server, tmp_path):
    stack = stack_for(tmp_path, "cold", REDIS_URL=redis_server,
                      STORAGE_URL=f"file://{tmp_path / 'store'}", **FAST_WORKER)
    try:
        stack.start_gateway()
        worker = stack.start_worker()
        job = stack.submit_job(trio_job(1), LONG)
        stack.wait(job["id"], ("running",), min_step=1, timeout=120)
        os.kill(worker.pid, signal.SIGINT)  # warm: finish the job, then stop...
        time.sleep(1.5)  # (RQ ignores a second signal within a second of the first)
        os.kill(worker.pid, signal.SIGINT)  # ...cold: stop now
        worker.wait(timeout=30)
        done = stack.wait(job["id"], ("failed",), timeout=60)
        assert done["error"]["code"] == "worker_lost", done
    finally:
        stack.stop()


def test_a_stalled_body_is_dropped(redis_db, redis_server, tmp_path):
    import socket

    stack = stack_for(tmp_path, "stall", REDIS_URL=redis_server,
                      STORAGE_URL=f"file://{tmp_path / 'store'}", BODY_TIMEOUT_S=1)
    try:
        stack.start_gateway()
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                         b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n")
            started = time.monotonic()
            reply = b""
            while chunk := sock.recv(4096):  # headers and body may come apart; then close
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"request_timeout" in reply and time.monotonic() - started < 5
    finally:
        stack.stop()


def test_jobs_batched_by_a_worker_and_a_batch_whose_worker_dies(redis_db, redis_server,
                                                                tmp_path):
    """Jobs queued through the gateway with one shape run as one batch (the gateway's
    batch key, the worker's BATCH_MAX); a worker killed mid-batch: once a worker is
    back, every job of the batch is failed `worker_lost`, none stays running."""
    # BATCH_WAIT_MS: the three long jobs are submitted one after another while the
    # worker is idle; it waits for the others before starting the first.
    stack = stack_for(tmp_path, "batch", REDIS_URL=redis_server, BATCH_MAX=3,
                      BATCH_WAIT_MS=4000, STORAGE_URL=f"file://{tmp_path / 'store'}",
                      REFERENCE_SEED=0, **FAST_WORKER)
    try:
        stack.start_gateway()
        small = [stack.submit_job(trio_job(1), {**SMALL, "seed": s}) for s in (1, 2, 3)]
        worker = stack.start_worker(wait=False)
        for job in small:
            done = stack.wait(job["id"], ("succeeded",), timeout=180)
            assert done["reproducibility"]["timings_s"]["batch"] == 3, done
        long = [stack.submit_job(trio_job(1), {**MID, "seed": s}) for s in (1, 2, 3)]
        for job in long:
            stack.wait(job["id"], ("running",), min_step=1, timeout=180)
        stack.kill_worker(worker)
        # The restarted worker's maintenance (compose restarts a dead worker) finds the
        # batch's jobs abandoned.
        stack.start_worker(wait=False)
        for job in long:
            done = stack.wait(job["id"], ("failed",), timeout=90)
            assert done["error"]["code"] == "worker_lost", done
        assert stack.client.get("/v1/jobs").json()  # the gateway still answers
    finally:
        stack.stop()
