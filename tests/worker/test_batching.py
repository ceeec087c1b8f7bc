"""Batching across requests in the worker (BATCH_MAX, BATCH_WAIT_MS), on a real Redis
and storage: queued jobs of one batch key run as one batch, each job's image is the
image it gets alone, and a cancel, a bad input or another shape stays with its job."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from service import jobs, keys, metrics
from service.storage import input_key, request_key

from ..helpers.examples import trio_job
from .test_worker import describe, run_burst


def submit(rt, queue, *, seed: int, prompt: str | None = None, size: int = 128,
           batch_key: str | None = "shape-a", concepts=None):
    job = trio_job(2)
    job_id = jobs.new_job_id()
    record = {"prompt": prompt or job["prompt"], "concepts": concepts or job["concepts"],
              "params": {"steps": 3, "guidance_scale": 7.5, "alpha": 0.4, "seed": seed,
                         "negative_prompt": "", "width": size, "height": size},
              "masks": True}
    rt.storage.put(request_key(job_id), json.dumps(record).encode())
    for i, (img, m) in enumerate(zip(job["images"], job["masks"], strict=True)):
        rt.storage.put(input_key(job_id, "image", i), open(img, "rb").read())
        rt.storage.put(input_key(job_id, "mask", i), open(m, "rb").read())
    return jobs.enqueue(queue, job_id, 3, 60, 600, batch_key=batch_key)


def image_of(rt, job) -> np.ndarray:
    data = rt.storage.get(f"jobs/{job.id}/output/image.png")
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def batch_size(job) -> int | None:
    job.refresh()
    return job.meta["reproducibility"]["timings_s"].get("batch")


def sampling_counts(rt) -> tuple[float, float]:
    """The workers' (sampling runs, jobs sampled) counters."""
    counts = rt.redis.hgetall(keys.METRICS_KEY)
    return tuple(float(counts.get(k.encode(), 0)) for k in ("sampling_batches",
                                                             "sampled_jobs"))


@pytest.fixture
def batching(runtime):
    rt, queue = runtime
    rt.settings = rt.settings.model_copy(update={"batch_max": 4, "batch_wait_ms": 0,
                                                 "reference_seed": 0})
    return rt, queue


def solo_images(rt, queue, specs) -> list[np.ndarray]:
    """The same jobs run one at a time (batching off)."""
    before = rt.settings
    rt.settings = before.model_copy(update={"batch_max": 1})
    try:
        solo = [submit(rt, queue, **spec) for spec in specs]
        run_burst(rt, queue)
        for job in solo:
            assert describe(job, queue)["status"] == "succeeded"
            assert batch_size(job) is None
        return [image_of(rt, j) for j in solo]
    finally:
        rt.settings = before


def test_queued_jobs_of_one_key_run_as_one_batch_with_their_solo_images(batching):
    rt, queue = batching
    specs = [{"seed": 1}, {"seed": 2, "prompt": "a man with a hat wearing sunglasses, "
                                              "in the rain"},
             {"seed": 3}, {"seed": 4}, {"seed": 5}]
    want = solo_images(rt, queue, specs)
    batched = [submit(rt, queue, **spec) for spec in specs]
    before = sampling_counts(rt)
    run_burst(rt, queue)
    # BATCH_MAX=4: the first four together, the fifth alone.
    assert [batch_size(j) for j in batched] == [4, 4, 4, 4, None]
    after = sampling_counts(rt)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 5)
    text = metrics.render(rt.redis, queue).decode()
    assert f"magicface_sampling_batches_total {after[0]}" in text
    assert f"magicface_sampled_jobs_total {after[1]}" in text
    for job, w in zip(batched, want, strict=True):
        view = describe(job, queue)
        assert view["status"] == "succeeded", view
        assert np.abs(image_of(rt, job) - w).max() <= 1  # float order, then rounding
        assert view["progress"]["step"] == 3
    assert not np.array_equal(image_of(rt, batched[0]), image_of(rt, batched[1]))
    # Nothing left behind in RQ's queues.
    assert queue.count == 0 and rt.redis.llen(queue.intermediate_queue_key) == 0


def test_a_job_canceled_mid_batch_ends_canceled_and_the_others_succeed(batching):
    rt, queue = batching
    a, b, c = (submit(rt, queue, seed=s) for s in (1, 2, 3))
    real = rt.pipe.generate_batch

    def cancel_b_after_its_first_step(requests, max_batch):
        # The client's cancel arrives while the batch runs: b's flag is set after its
        # first step, as DELETE /v1/jobs/{id} would set it.
        wrapped = list(requests)
        original = wrapped[1].on_step

        def on_step(step, total):
            if step == 1:
                rt.redis.set(keys.CANCEL_KEY.format(b.id), "canceled")
            original(step, total)

        wrapped[1].on_step = on_step
        return real(wrapped, max_batch=max_batch)

    rt.pipe.generate_batch = cancel_b_after_its_first_step
    try:
        run_burst(rt, queue)
    finally:
        del rt.pipe.generate_batch
    views = [describe(j, queue) for j in (a, b, c)]
    assert [v["status"] for v in views] == ["succeeded", "canceled", "succeeded"]
    assert views[1]["progress"]["step"] == 1
    assert not rt.storage.exists(f"jobs/{b.id}/output/image.png")
    assert [batch_size(j) for j in (a, c)] == [3, 3]


def test_an_invalid_job_fails_alone_in_its_batch(batching):
    rt, queue = batching
    good = submit(rt, queue, seed=1)
    bad = submit(rt, queue, seed=2, prompt="a landscape at dusk")  # no concept word
    other = submit(rt, queue, seed=3)
    run_burst(rt, queue)
    assert describe(good, queue)["status"] == "succeeded"
    assert describe(other, queue)["status"] == "succeeded"
    view = describe(bad, queue)
    assert view["status"] == "failed" and view["error"]["code"] == "invalid_input"
    assert batch_size(good) == batch_size(other) == 3  # taken together


def test_jobs_of_another_key_stay_queued_for_their_own_batch(batching):
    rt, queue = batching
    a1 = submit(rt, queue, seed=1)
    b1 = submit(rt, queue, seed=2, size=64, batch_key="shape-b")
    a2 = submit(rt, queue, seed=3)
    b2 = submit(rt, queue, seed=4, size=64, batch_key="shape-b")
    none = submit(rt, queue, seed=5, batch_key=None)  # queued before keys existed
    run_burst(rt, queue)
    for job in (a1, b1, a2, b2, none):
        assert describe(job, queue)["status"] == "succeeded"
    assert [batch_size(j) for j in (a1, a2, b1, b2, none)] == [2, 2, 2, 2, None]
    assert image_of(rt, b1).shape[:2] == (64, 64)


def test_a_job_taken_by_another_worker_is_not_claimed_twice(batching):
    from worker.claims import claim as _claim

    rt, queue = batching
    job = submit(rt, queue, seed=1)
    assert _claim(queue, job.id) is True
    assert _claim(queue, job.id) is False  # already gone from the queue
    assert rt.redis.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]
