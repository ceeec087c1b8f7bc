"""Retention: a job's objects and Redis traces go RESULT_TTL_S after it ends.

When a job ends, its expiry goes into an index in Redis (`RETENTION_KEY`, a sorted set
of job id by expiry time). Each SWEEP_INTERVAL_S one worker (a Redis lock) takes what is
due from the index, deletes the job's objects and every Redis key of it (record, event
stream, webhook state, owner index entry), and drops it from the index: the cost of a
sweep grows with what is due, not with the bucket. Objects that never got a record (a
gateway that died between storing and queueing) are found by listing the bucket, at
most once per ORPHAN_GRACE_S, and go once they are ORPHAN_GRACE_S old and no record
names them."""

from __future__ import annotations

import logging
import time

from redis import Redis
from rq.exceptions import NoSuchJobError

from service import jobs
from service.keys import ORPHAN_LOCK, RETENTION_KEY, SWEEP_LOCK, parse_retention_member, rq_job_key
from service.queueing import fetch_job
from service.storage import Storage, job_prefix

__all__ = ["sweep_due", "sweep_orphans", "sweep_if_due", "SWEEP_LOCK", "ORPHAN_LOCK"]

log = logging.getLogger("magicface.worker")
BATCH = 500  # due jobs per sweep at most; the next sweep takes the rest


def sweep_due(storage: Storage, redis: Redis, now: float | None = None) -> list[str]:
    """Delete the jobs whose retention ended by `now`: objects first, then their Redis
    keys, then their index entry (a failure leaves the entry for the next sweep)."""
    now = time.time() if now is None else now
    members = [r.decode() if isinstance(r, bytes) else r
               for r in redis.zrangebyscore(RETENTION_KEY, "-inf", now, start=0, num=BATCH)]
    swept = []
    for member in members:
        job_id, owner = parse_retention_member(member)
        storage.delete_prefix(job_prefix(job_id))
        try:
            jobs.purge(redis, fetch_job(job_id, redis))
        except NoSuchJobError:  # RQ's own TTL took the record first
            jobs.forget_keys(redis, job_id, owner)
        swept.append(job_id)
    if swept:
        log.info("swept %d job(s) past their retention", len(swept))
    return swept


def sweep_orphans(storage: Storage, redis: Redis, grace_s: float,
                  now: float | None = None) -> list[str]:
    """Delete the objects of jobs that have no record and no index entry, once their
    newest object is `grace_s` old. Lists the bucket: run it rarely."""
    now = time.time() if now is None else now
    swept = []
    for job_id, newest in storage.job_ages().items():
        # A due job whose record is gone may go here first: it is past retention.
        if now - newest < grace_s or redis.exists(rq_job_key(job_id)):
            continue
        storage.delete_prefix(job_prefix(job_id))
        swept.append(job_id)
    if swept:
        log.info("swept the objects of %d job(s) that never had a record", len(swept))
    return swept


def sweep_if_due(storage: Storage, redis: Redis, grace_s: float, interval_s: float) -> None:
    """The due sweep unless another worker ran it in the last `interval_s` seconds; the
    orphan sweep unless one ran in the last max(interval_s, grace_s)."""
    if redis.set(SWEEP_LOCK, "1", nx=True, ex=max(1, int(interval_s))):
        sweep_due(storage, redis)
    if redis.set(ORPHAN_LOCK, "1", nx=True, ex=max(1, int(max(interval_s, grace_s)))):
        sweep_orphans(storage, redis, grace_s)
