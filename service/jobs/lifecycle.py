"""Ending and removing jobs: the terminal event, cancel and expiry, delete and purge,
retention. Shared by the gateway, the workers' maintenance and the sweeper."""

from __future__ import annotations

import logging
import time

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from .. import fairness, metrics, records
from ..keys import (
    CANCEL_KEY,
    DEADLINES_KEY,
    DELETED_KEY,
    FLAG_TTL_S,
    OWNER_JOBS_KEY,
    RETENTION_KEY,
    TERMINAL_KEY,
    WEBHOOK_KEY,
    WEBHOOK_LOG_KEY,
    retention_member,
)
from ..queueing import fetch_job
from ..records import UnreadableRecord
from ..schemas import EventType, JobState
from ..storage import Storage, StorageError, input_prefix, job_prefix, request_key
from . import events
from .errors import JobFinished, JobNotFound
from .queries import describe, fetch, status_of

__all__ = ["retain", "publish_end", "cancel", "expire", "expire_if_due", "delete", "purge",
           "forget_keys", "reconcile", "drop_inputs", "remove_objects"]

log = logging.getLogger("magicface.jobs")


def retain(redis: Redis, job: Job, record_ttl_s: int) -> None:
    """Index an ended job for the sweeper: everything of it goes `record_ttl_s` from now
    (the first end counts: a later call does not push the expiry back)."""
    member = retention_member(job.id, records.owner_of(job))
    redis.zadd(RETENTION_KEY, {member: time.time() + record_ttl_s}, nx=True)


def publish_end(redis: Redis, job: Job, queue: Queue, record_ttl_s: int) -> bool:
    """The job's terminal event with its final view, if the job has ended (once per
    job: later calls are no-ops). True when the job has ended."""
    job.refresh()
    view = describe(job, queue, refresh=False)
    if not view.status.terminal:
        return False
    retain(redis, job, record_ttl_s)
    events.publish(redis, job.id, EventType(view.status.value),
                   view.model_dump(mode="json"), record_ttl_s)
    return True


def cancel(redis: Redis, job: Job, record_ttl_s: int, queue: Queue,
           state: JobState = JobState.CANCELED) -> bool:
    """Stop a job: at once when queued (its record then expires after `record_ttl_s`,
    as a finished job's does), at its next step when running (its state is then
    `cancel_requested` until the worker stops it). True when it was stopped while
    queued (it will never run). `state`: canceled (a client) or expired (a deadline)."""
    job.refresh()
    status = status_of(job)
    if status.terminal:
        raise JobFinished(f"job {job.id} is already {status.value}")
    # The flag stops a running job at its next step; it also catches a job that a
    # worker dequeues between our status read and the cancel below. Its value is the
    # state the job ends in.
    redis.set(CANCEL_KEY.format(job.id), state.value, ex=FLAG_TTL_S)
    if status != JobState.QUEUED:
        return False
    rec = records.read(job)  # a queued job's record is readable (status_of says so)
    rec.state, rec.ended_at = state, time.time()
    records.write(job, rec)
    try:
        job.cancel()
    except Exception:  # noqa: BLE001 - already dequeued: the flag stops it
        return False
    redis.expire(job.key, record_ttl_s)
    fairness.forget(redis, job.origin, job.id)  # out of the queue for good
    retain(redis, job, record_ttl_s)
    metrics.count(redis, f"jobs_{state.value}")
    metrics.count(redis, f"queued_{state.value}")
    events.publish(redis, job.id, EventType(state.value),
                   describe(job, queue).model_dump(mode="json"), record_ttl_s)
    return True


def expire(redis: Redis, queue: Queue, record_ttl_s: int, now: float | None = None) -> int:
    """End the jobs whose deadline has passed (queued: at once; running: at their next
    step), each as `expired`. Run by the workers' maintenance; returns how many."""
    now = time.time() if now is None else now
    n = 0
    for raw in redis.zrangebyscore(DEADLINES_KEY, "-inf", now, start=0, num=100):
        job_id = raw.decode() if isinstance(raw, bytes) else raw
        redis.zrem(DEADLINES_KEY, job_id)
        try:
            job = fetch_job(job_id, redis)
            deadline = records.read(job).deadline
        except (NoSuchJobError, UnreadableRecord):
            continue
        status = status_of(job)
        if status.terminal:
            continue
        if not (deadline is not None and now >= deadline) and status != JobState.QUEUED:
            # Started in time: only Cancel-After (if any) still applies.
            if deadline is not None:
                redis.zadd(DEADLINES_KEY, {job_id: deadline})
            continue
        try:
            cancel(redis, job, record_ttl_s, queue, state=JobState.EXPIRED)
            n += 1
        except JobFinished:
            continue
    return n


def expire_if_due(redis: Redis, job: Job, queue: Queue, record_ttl_s: int) -> None:
    """Expire a queued job whose deadline has passed, now: a reader must not see it
    `queued` past its deadline while every worker is busy or none runs."""
    try:
        due = records.read(job).due()
    except UnreadableRecord:
        return
    if due is None or time.time() < due or status_of(job) != JobState.QUEUED:
        return
    try:
        cancel(redis, job, record_ttl_s, queue, state=JobState.EXPIRED)
    except JobFinished:
        pass


def delete(redis: Redis, job: Job, owner: str) -> bool:
    """Delete the job: its record, events, webhook state and index entry (the caller
    removes its storage objects). A running job is hidden at once and stopped at its
    next step; its worker removes it then (False is returned)."""
    jid = job.id
    job.refresh()
    if status_of(job) in (JobState.RUNNING, JobState.CANCEL_REQUESTED):
        redis.set(DELETED_KEY.format(jid), "1", ex=FLAG_TTL_S)
        redis.set(CANCEL_KEY.format(jid), JobState.CANCELED.value, ex=FLAG_TTL_S)
        redis.zrem(OWNER_JOBS_KEY.format(owner), jid)
        return False
    purge(redis, job)
    return True


def purge(redis: Redis, job: Job) -> None:
    """Remove every Redis trace of a job (not its storage objects)."""
    jid = job.id
    try:
        job.cancel()
    except Exception:  # noqa: BLE001 - not queued any more
        pass
    job.delete(remove_from_queue=True, delete_dependents=False)
    fairness.forget(redis, job.origin, jid)
    forget_keys(redis, jid, records.owner_of(job))


def forget_keys(redis: Redis, job_id: str, owner: str) -> None:
    """Remove the job's own Redis keys and index entries (its RQ record aside): what
    `purge` does after the record, and all the sweeper can do once RQ's TTL took the
    record first. The retention entry goes last, so a failure leaves it to retry."""
    redis.delete(events.events_key(job_id), TERMINAL_KEY.format(job_id),
                 WEBHOOK_KEY.format(job_id), WEBHOOK_LOG_KEY.format(job_id),
                 CANCEL_KEY.format(job_id))
    redis.zrem(OWNER_JOBS_KEY.format(owner), job_id)
    redis.zrem(DEADLINES_KEY, job_id)
    redis.zrem(RETENTION_KEY, retention_member(job_id, owner))


def reconcile(redis: Redis, queue: Queue, job_id: str, record_ttl_s: int) -> str:
    """"gone" (no such job any more), "ended" (its terminal event is in the log, now
    at the latest) or "live": what an event stream with nothing new asks."""
    try:
        job = fetch(redis, job_id)
    except JobNotFound:
        return "gone"
    expire_if_due(redis, job, queue, record_ttl_s)
    if events.has_terminal(redis, job_id) or publish_end(redis, job, queue, record_ttl_s):
        return "ended"
    return "live"


def drop_inputs(storage: Storage, job_id: str) -> None:
    """The job's uploads and request record (a job that will never run again)."""
    storage.delete_prefix(input_prefix(job_id))
    storage.delete(request_key(job_id))


def remove_objects(storage: Storage, job_id: str, why: str) -> None:
    """Every object of the job, best effort: what is left, the sweeper takes."""
    try:
        storage.delete_prefix(job_prefix(job_id))
    except StorageError as e:
        log.warning("job %s: objects left to the sweeper (%s): %s", job_id, why, e)
