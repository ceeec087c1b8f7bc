"""Fair queueing between API keys: the queue is kept in round-robin order by key, so a
key's burst does not hold back another key's job; MAX_QUEUED_PER_KEY refuses one key's
submissions (429 key_queue_full, Retry-After) while others go on."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from service import fairness, jobs
from service.app import create_app
from service.settings import Settings
from service.storage import input_key, request_key

from ..helpers.examples import trio_job
from ..helpers.images import png
from ..helpers.multipart import job_form
from .test_worker import run_burst


def submit_as(rt, queue, owner: str, steps: int = 1):
    job = trio_job(1)
    job_id = jobs.new_job_id()
    record = {"prompt": job["prompt"], "concepts": job["concepts"],
              "params": {"steps": steps, "guidance_scale": 7.5, "alpha": 0.4, "seed": 1,
                         "negative_prompt": "", "width": 64, "height": 64}, "masks": True}
    rt.storage.put(request_key(job_id), json.dumps(record).encode())
    for i, (img, m) in enumerate(zip(job["images"], job["masks"], strict=True)):
        rt.storage.put(input_key(job_id, "image", i), open(img, "rb").read())
        rt.storage.put(input_key(job_id, "mask", i), open(m, "rb").read())
    return jobs.enqueue(queue, job_id, steps, 60, 600, owner)


def test_the_queue_is_round_robin_between_keys(runtime):
    rt, queue = runtime
    order = ["a", "a", "a", "a", "b", "c", "b", "a", "c"]
    made = [(owner, submit_as(rt, queue, owner).id) for owner in order]
    owner_of = dict((jid, o) for o, jid in made)
    queued = [owner_of[j] for j in queue.get_job_ids()]
    # Round 0: a, b, c; round 1: a, b, c; then a's backlog.
    assert queued == ["a", "b", "c", "a", "b", "c", "a", "a", "a"], queued
    assert fairness.queued_for(rt.redis, queue, "a") == 5
    assert fairness.queued_for(rt.redis, queue, "nobody") == 0


def test_a_flooding_key_does_not_delay_another_keys_job(runtime):
    rt, queue = runtime
    # One job per run, so the start order is the queue's order (batching would start
    # key B's job within the first batch anyway, in an order of its own).
    rt.settings = rt.settings.model_copy(update={"batch_max": 1})
    flood = [submit_as(rt, queue, "key-a") for _ in range(8)]
    single = submit_as(rt, queue, "key-b")
    run_burst(rt, queue)
    for j in (*flood, single):
        j.refresh()
    started = sorted((*flood, single), key=lambda j: j.started_at)
    position = started.index(next(j for j in started if j.id == single.id))
    print(f"key B's one job started as run {position + 1} of {len(started)}, "
          f"after {position} of key A's {len(flood)} queued before it")
    assert position <= 1, [j.id for j in started]
    assert all(jobs.status_of(j).value == "succeeded" for j in started)


def test_max_queued_per_key_refuses_that_key_only(redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server, api_keys="key-one,key-two",
                        storage_url=f"file://{tmp_path}", max_queued_per_key=2)
    from service.storage import LocalStorage

    def post(client, key):
        form = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}],
                        [png(), png()], [png(), png()], {"steps": 2, "width": 64,
                                                         "height": 64})
        return client.post("/v1/jobs", **form, headers={"Authorization": f"Bearer {key}"})

    with TestClient(create_app(settings, storage=LocalStorage(tmp_path))) as client:
        assert [post(client, "key-one").status_code for _ in range(2)] == [202, 202]
        r = post(client, "key-one")
        assert r.status_code == 429 and r.json()["error"]["code"] == "key_queue_full"
        assert int(r.headers["Retry-After"]) >= 1
        assert "MAX_QUEUED_PER_KEY" in r.json()["error"]["message"]
        assert post(client, "key-two").status_code == 202  # another key is not held up
