"""End to end over real HTTP, a real Redis, real worker processes and real storage
(a local folder, and S3 on a loopback moto server)."""

from __future__ import annotations

import io
import time

import boto3
import numpy as np
from PIL import Image

from ..helpers.examples import trio_job
from ..helpers.stack import Stack

SMALL = {"steps": 4, "width": 128, "height": 128, "seed": 11}
# Slow enough on a CPU to be caught mid-run.
LONG = {"steps": 100, "width": 448, "height": 448, "seed": 3}


def _png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.size


def test_readyz_needs_a_worker(file_stack):
    r = file_stack.client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    file_stack.start_worker()
    assert file_stack.client.get("/readyz").json()["status"] == "ready"


def test_two_concept_job_with_file_storage(file_stack, tmp_path):
    file_stack.start_worker()
    job = trio_job(2)
    r = file_stack.submit(job["prompt"], job["concepts"], job["images"], job["masks"], SMALL)
    assert r.status_code == 202, r.text
    view = r.json()
    assert r.headers["location"] == f"/v1/jobs/{view['id']}"
    assert view["status"] in ("queued", "running") and view["progress"]["total"] == 4
    done = file_stack.wait(view["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 4, "total": 4, "percent": 100.0, "eta_s": None,
                                "stage": "done"}
    assert done["error"] is None and done["finished_at"] >= done["started_at"]
    img = file_stack.client.get(done["result"]["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert _png_size(img.content) == (128, 128)
    smap = file_stack.client.get(done["result"]["semantic_map_url"])
    assert _png_size(smap.content) == (128, 128)
    # Keys come from the job id, not from the client's file names.
    stored = sorted(p.relative_to(tmp_path / "store").as_posix()
                    for p in (tmp_path / "store").rglob("*") if p.is_file())
    jid = view["id"]
    # The uploads went when the job ended (KEEP_INPUTS=false); the outputs stay.
    assert stored == sorted([f"jobs/{jid}/output/image.png",
                             f"jobs/{jid}/output/semantic_map.png"])


def test_cache_hit_gives_the_same_image(file_stack):
    file_stack.start_worker()
    job = trio_job(2)
    first = file_stack.wait(file_stack.submit_job(job, SMALL)["id"])
    second = file_stack.wait(file_stack.submit_job(job, SMALL)["id"])
    assert first["cache"] == {"hits": 0, "misses": 2}
    assert second["cache"] == {"hits": 2, "misses": 0}
    a = file_stack.client.get(first["result"]["image_url"]).content
    b = file_stack.client.get(second["result"]["image_url"]).content
    # Same image up to float rounding: on a miss the target rows share the UNet batch
    # with the references, on a hit they run alone, and CPU kernels round by batch.
    pa = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
    pb = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
    assert np.abs(pa - pb).max() <= 2 and np.abs(pa - pb).mean() < 0.05
    metrics = file_stack.client.get("/metrics").text
    assert "magicface_kv_cache_hits_total 2.0" in metrics
    assert 'magicface_jobs_ended_total{status="succeeded"} 2.0' in metrics
    assert "magicface_job_duration_seconds_count 2.0" in metrics


def test_cancel_queued_and_running_jobs(file_stack):
    file_stack.start_worker()
    job = trio_job(1)
    running = file_stack.submit_job(job, LONG)
    queued = file_stack.submit_job(job, SMALL)
    file_stack.wait(running["id"], statuses=("running",), min_step=1, timeout=60)
    view = file_stack.client.get(f"/v1/jobs/{queued['id']}").json()
    assert view["status"] == "queued" and view["queue_position"] == 0

    r = file_stack.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["finished_at"] is not None

    # A running job answers cancel_requested until it stops at its next step.
    r = file_stack.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancel_requested", "canceled")
    done = file_stack.wait(running["id"], timeout=60)
    assert done["status"] == "canceled"
    assert done["progress"]["step"] < LONG["steps"]
    assert done["result"] is None
    # Finished jobs cannot be canceled; the canceled queued job never ran.
    r = file_stack.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    view = file_stack.client.get(f"/v1/jobs/{queued['id']}").json()
    assert view["status"] == "canceled" and view["started_at"] is None
    assert done["finished_at"] is not None and done["error"]["code"] == "canceled"
    img = file_stack.client.get(f"/v1/jobs/{running['id']}/image")
    assert img.status_code == 410 and img.json()["error"]["code"] == "canceled"


def test_killed_worker_fails_its_job_with_worker_lost(file_stack):
    worker = file_stack.start_worker()
    job = trio_job(1)
    victim = file_stack.submit_job(job, LONG)
    waiting = file_stack.submit_job(job, SMALL)
    file_stack.wait(victim["id"], statuses=("running",), min_step=1, timeout=60)
    file_stack.kill_worker(worker)
    killed_at = time.monotonic()
    assert file_stack.client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"
    file_stack.start_worker(wait=False)
    done = file_stack.wait(victim["id"], statuses=("failed",), timeout=60)
    assert done["error"]["code"] == "worker_lost"
    assert time.monotonic() - killed_at < 60
    # Nothing else is lost: the job queued behind it runs on the new worker, and so
    # does a new one.
    assert file_stack.wait(waiting["id"])["status"] == "succeeded"
    nxt = file_stack.submit_job(job, SMALL)
    assert file_stack.wait(nxt["id"])["status"] == "succeeded"


def test_a_job_whose_only_worker_died_fails_with_no_worker_alive(file_stack):
    """No surviving worker to notice: the gateway's reaper fails the job worker_lost
    within WORKER_HEARTBEAT_TTL_S (4 s here) + one maintenance interval (2 s)."""
    worker = file_stack.start_worker()
    victim = file_stack.submit_job(trio_job(1), LONG)
    file_stack.wait(victim["id"], statuses=("running",), min_step=1, timeout=60)
    file_stack.kill_worker(worker)
    killed_at = time.monotonic()
    done = file_stack.wait(victim["id"], statuses=("failed",), timeout=30)
    took = time.monotonic() - killed_at
    print(f"the only worker SIGKILLed: its job failed worker_lost {took:.1f} s later")
    assert done["error"]["code"] == "worker_lost", done
    assert took < 4 + 2 + 4, took  # TTL + interval, and a poll's slack on a busy machine
    events = file_stack.client.get(f"/v1/jobs/{victim['id']}/events").text
    assert "event: failed" in events  # the stream (and webhooks) hear of the end too


def test_two_concept_job_with_s3_storage(redis_db, redis_server, s3_endpoint, tmp_path):
    bucket = f"magicface-{int(time.time() * 1000)}"
    stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"s3://{bucket}/runs",
                   "S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing"}, tmp_path / "logs")
    try:
        stack.start_gateway()
        stack.start_worker()
        job = trio_job(2)
        view = stack.submit_job(job, SMALL)
        done = stack.wait(view["id"])
        assert done["status"] == "succeeded", (done, stack.log("worker0"))
        img = stack.client.get(done["result"]["image_url"])
        assert _png_size(img.content) == (128, 128)
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        key = f"runs/jobs/{view['id']}/output/image.png"
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == img.content
    finally:
        stack.stop()

    # With a public URL set, downloads redirect to a presigned URL.
    stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"s3://{bucket}/runs",
                   "S3_ENDPOINT_URL": s3_endpoint, "S3_PUBLIC_URL": s3_endpoint,
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                  tmp_path / "logs2")
    try:
        stack.start_gateway()
        r = stack.client.get(done["result"]["image_url"], follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"].startswith(s3_endpoint)
        followed = stack.client.get(done["result"]["image_url"], follow_redirects=True)
        assert followed.content == img.content
    finally:
        stack.stop()
