"""The reaper on a real Redis: an abandoned job (its worker's heartbeat deadline passed)
ends `failed` / `worker_lost` with its terminal event, but not while the Redis server has
only just restarted (its deadlines passed while it was down, not because the worker
died), and not as a side effect of a metrics scrape."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from rq.job import JobStatus

from service.app import create_app
from service.jobs import events
from service.queueing import fetch_job, open_queue
from service.reaper import reap, settled
from service.settings import Settings
from service.storage import LocalStorage

from ..helpers.images import png
from ..helpers.multipart import job_form


@pytest.fixture
def api(redis_db, redis_server, tmp_path):
    # The gateway's own reaper sleeps an hour: the test calls `reap` itself.
    settings = Settings(redis_url=redis_server, storage_url=f"file://{tmp_path}/store",
                        worker_maintenance_interval_s=3600)
    with TestClient(create_app(settings, storage=LocalStorage(tmp_path / "store"))) as c:
        c.queue = open_queue(settings.queue_name, redis_db)
        c.redis = redis_db
        yield c


def abandoned_job(api) -> str:
    """A job as a worker leaves it when killed: taken off the queue, `started`, its
    started-registry entry's deadline in the past."""
    form = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}],
                    [png(), png()], [png(), png()], {"steps": 3, "width": 128, "height": 128})
    r = api.post("/v1/jobs", **form)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = fetch_job(job_id, api.redis)
    api.queue.remove(job)
    job.set_status(JobStatus.STARTED)
    api.redis.zadd(api.queue.started_job_registry.key,
                   {f"{job_id}:an-execution": time.time() - 60})
    return job_id


def test_an_abandoned_job_ends_worker_lost_with_its_terminal_event(api):
    job_id = abandoned_job(api)
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    assert reap(api.redis, api.queue, 60, 1, force=True, settle_s=0) == [job_id]
    assert events.has_terminal(api.redis, job_id)
    body = api.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost", body


def test_nothing_is_reaped_while_redis_has_just_restarted(api):
    job_id = abandoned_job(api)
    uptime = float(api.redis.info("server")["uptime_in_seconds"])
    young = uptime + 3600  # the server reads as younger than the settle period
    assert not settled(api.redis, young) and settled(api.redis, 0)
    assert reap(api.redis, api.queue, 60, 1, force=True, settle_s=young) == []
    assert not events.has_terminal(api.redis, job_id)
    assert api.queue.started_job_registry.get_job_ids(cleanup=False) == [job_id]
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    # Once settled, the same job is reaped.
    assert reap(api.redis, api.queue, 60, 1, force=True, settle_s=0) == [job_id]


def test_a_metrics_scrape_does_not_fail_running_jobs(api):
    job_id = abandoned_job(api)
    assert api.get("/metrics").status_code == 200
    assert api.queue.started_job_registry.get_job_ids(cleanup=False) == [job_id]
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
