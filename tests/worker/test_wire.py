"""Nothing read from Redis is unpickled: a job planted with pickled payloads (as release
0.1 queued every job, or as anyone who can write to Redis could) is failed
`unreadable_job` without running anything, the worker keeps serving, and the gateway
reports such a record (queued or finished) as a defined failed state, never a 500."""

from __future__ import annotations

import pickle
import zlib

from fastapi.testclient import TestClient
from rq import Queue

from service import jobs
from service.app import create_app
from service.queueing import JobSerializer, UnreadableRecord, fetch_job
from service.settings import Settings

from ..helpers.images import png
from ..helpers.multipart import job_form
from .test_worker import describe, run_burst, submit

K1 = {"Authorization": "Bearer key-one"}


class Planted:
    """Unpickling this creates `path`: the proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_serializer_reads_json_and_refuses_everything_else(tmp_path):
    marker = tmp_path / "ran"
    assert JobSerializer.loads(JobSerializer.dumps({"a": [1, 2.5, None]})) == {"a": [1, 2.5,
                                                                                None]}
    for raw in (pickle.dumps(Planted(marker)), pickle.dumps({"x": 1}, protocol=0),
                b"\xff\xfe", b"{not json"):
        try:
            JobSerializer.loads(raw)
        except UnreadableRecord:
            pass
        else:
            raise AssertionError(f"{raw!r} was read")
    assert not marker.exists()


def test_a_job_queued_in_the_pickle_format_fails_unread_and_the_worker_goes_on(runtime,
                                                                               tmp_path):
    rt, queue = runtime
    marker = tmp_path / "code-ran"
    # What release 0.1's gateway wrote (RQ's default pickle serializer), here carrying a
    # payload in both the call and the meta.
    old = Queue(queue.name, connection=rt.redis)
    planted = old.enqueue_call(jobs.JOB_FUNC, args=(Planted(marker),),
                               meta={"owner": Planted(marker)}, job_id=jobs.new_job_id())
    fine = submit(rt.storage, queue)
    run_burst(rt, queue)
    assert not marker.exists(), "a pickle from Redis was loaded"
    view = describe(fetch_job(planted.id, rt.redis), queue)
    assert view["status"] == "failed" and view["error"]["code"] == "unreadable_job", view
    assert "submit it again" in view["error"]["message"]
    assert describe(fine, queue)["status"] == "succeeded"
    # RQ's registry clean-ups and a later batch scan read the planted job again: still
    # nothing is loaded.
    run_burst(rt, queue)
    assert not marker.exists()


def test_a_raw_planted_hash_with_pickled_data_never_runs(runtime, tmp_path):
    rt, queue = runtime
    marker = tmp_path / "code-ran"
    job_id = jobs.new_job_id()
    rt.redis.hset(f"rq:job:{job_id}", mapping={
        "data": zlib.compress(pickle.dumps((jobs.JOB_FUNC, None, (Planted(marker),), {}))),
        "meta": JobSerializer.dumps({"owner": "public", "batch_key": "k"}),
        "status": "queued", "origin": queue.name, "created_at": "2026-12-01T00:00:00.000000Z",
        "failure_callback_name": "os.system", "success_callback_name": "os.system"})
    rt.redis.rpush(queue.key, job_id)
    fine = submit(rt.storage, queue)
    run_burst(rt, queue)
    assert not marker.exists()
    view = describe(fetch_job(job_id, rt.redis), queue)
    assert view["status"] == "failed" and view["error"]["code"] == "unreadable_job", view
    assert describe(fine, queue)["status"] == "succeeded"


def test_the_gateway_reports_a_finished_jobs_planted_meta_to_its_owner(runtime, tmp_path):
    rt, queue = runtime
    marker = tmp_path / "code-ran"
    settings = Settings(redis_url=rt.settings.redis_url, api_keys="key-one,key-two",
                        storage_url=f"file://{tmp_path}", queue_name=queue.name)
    with TestClient(create_app(settings, storage=rt.storage)) as client:
        form = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}],
                        [png(), png()], [png(), png()], {"steps": 2, "width": 64,
                                                         "height": 64})
        owner = client.post("/v1/jobs", headers=K1, **form)
        assert owner.status_code == 202, owner.text
        job_id = owner.json()["id"]
        run_burst(rt, queue)
        assert client.get(f"/v1/jobs/{job_id}", headers=K1).json()["status"] == "succeeded"
        rt.redis.hset(f"rq:job:{job_id}", "meta", pickle.dumps(Planted(marker)))
        for path in (f"/v1/jobs/{job_id}", "/v1/jobs"):
            r = client.get(path, headers=K1)
            assert r.status_code == 200, r.text
            view = r.json() if path != "/v1/jobs" else r.json()["jobs"][0]
            assert view["status"] == "failed" and view["error"]["code"] == "unreadable_job"
        # Another key still cannot see it; the image route answers with the error.
        assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer key-two"}
                          ).status_code == 404
        r = client.get(f"/v1/jobs/{job_id}/image", headers=K1)
        assert r.status_code == 410 and r.json()["error"]["code"] == "unreadable_job"
        # JSON of the wrong shape (hand-written) is the same defined state.
        rt.redis.hset(f"rq:job:{job_id}", "meta", b'{"owner": "x", "progress": "lots"}')
        assert client.get(f"/v1/jobs/{job_id}", headers=K1).status_code in (200, 404)
    assert not marker.exists()


def test_every_queue_job_and_worker_is_opened_with_the_json_serializer():
    """A grep: RQ objects are made through service.queueing (or pass the serializer)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for folder in ("service", "worker", "tests", "scripts", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "queueing.py" or path == Path(__file__):
                continue
            for m in re.finditer(r"\b(Queue|Job\.fetch|Job\.fetch_many|fetch_many|Job\.create)"
                                 r"\((?P<args>[^)]*)\)", path.read_text()):
                assert "serializer" in m.group("args"), f"{path}: {m.group(0)}"
