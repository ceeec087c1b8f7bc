"""Retention: a job's objects go when its record does. The record expires in Redis
RESULT_TTL_S after the job ends (RQ's result and failure TTLs; a queued cancel sets
the same TTL); the sweeper then deletes every object of a job with no record, and
objects that never got a record (a gateway that died between storing and queueing)
once they are ORPHAN_GRACE_S old. One worker sweeps per interval (a Redis lock)."""

from __future__ import annotations

import logging
import time

from redis import Redis
from rq.job import Job

from service.storage import Storage

__all__ = ["sweep", "sweep_if_due", "SWEEP_LOCK"]

log = logging.getLogger("magicface.worker")
SWEEP_LOCK = "magicface:sweep-lock"


def sweep(storage: Storage, redis: Redis, grace_s: float, now: float | None = None
          ) -> list[str]:
    """Delete the objects of jobs without a Redis record whose newest object is at least
    `grace_s` old. Returns the job ids swept."""
    now = time.time() if now is None else now
    swept = []
    for job_id, newest in storage.job_ages().items():
        if now - newest < grace_s or Job.exists(job_id, connection=redis):
            continue
        storage.delete_prefix(f"jobs/{job_id}/")
        swept.append(job_id)
    if swept:
        log.info("swept the objects of %d expired job(s)", len(swept))
    return swept


def sweep_if_due(storage: Storage, redis: Redis, grace_s: float, interval_s: float) -> None:
    """Sweep unless another worker did in the last `interval_s` seconds."""
    if redis.set(SWEEP_LOCK, "1", nx=True, ex=max(1, int(interval_s))):
        sweep(storage, redis, grace_s)
