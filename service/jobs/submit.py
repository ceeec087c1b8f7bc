"""Making jobs: room in the queue, a submission validated, its inputs stored, the job
enqueued with its record, webhook, deadlines and owner index, and Idempotency-Key."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job

from .. import fairness, metrics
from ..errors import ApiError
from ..keys import (
    CANCEL_KEY,
    DEADLINES_KEY,
    FLAG_TTL_S,
    IDEMPOTENCY_KEY,
    OWNER_JOBS_KEY,
    WEBHOOK_KEY,
    trace_ttl,
)
from ..records import ANONYMOUS, JobRecord, StepProgress, WebhookSpec
from ..schemas import EventType, JobState, JobView, LegendEntry
from ..settings import Settings
from ..storage import Storage, StorageError, input_key, job_prefix, request_key
from ..submission import Submission
from ..validation import body_hash, validate_request
from ..workers import live_workers
from . import events
from .errors import IdempotencyConflict
from .lifecycle import purge
from .queries import describe, fetch, mean_duration

__all__ = ["TASK", "JOB_FUNC", "Webhook", "new_job_id", "enqueue", "legend", "create",
           "check_queue_room", "idempotency_name", "remember_idempotency",
           "lookup_idempotency"]

log = logging.getLogger("magicface.gateway")
audit = logging.getLogger("magicface.audit")

# The worker's job function (the `worker` package of the magicface-server distribution).
TASK = JOB_FUNC = "worker.tasks.generate"


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Webhook:
    url: str
    events: frozenset[EventType]


def legend(words: list[str]) -> list[LegendEntry]:
    """Each concept's tint in the semantic map (the palette the worker draws with)."""
    from magicface_core.overlay import concept_color

    return [LegendEntry(word=w, color="#{:02x}{:02x}{:02x}".format(*concept_color(i)))
            for i, w in enumerate(words)]


def enqueue(queue: Queue, job_id: str, steps: int, timeout_s: int, result_ttl_s: int,
            owner: str = ANONYMOUS, *, deadline: float | None = None,
            queue_deadline: float | None = None,
            webhook: Webhook | None = None, legend: list[LegendEntry] | None = None,
            inputs_sha256: list[str] | None = None, batch_key: str | None = None) -> Job:
    """Queue the job, with its webhook, deadlines and owner index, and append its
    `queued` event. Epoch seconds: unfinished by `deadline` (Cancel-After), or not
    started by `queue_deadline` (QUEUE_TTL_S), the job expires."""
    redis = queue.connection
    spec = (WebhookSpec(url=webhook.url, events=sorted(e.value for e in webhook.events))
            if webhook is not None else None)
    rec = JobRecord(progress=StepProgress(step=0, total=steps), owner=owner,
                    legend=legend or [], inputs_sha256=inputs_sha256 or [],
                    batch_key=batch_key, deadline=deadline, queue_deadline=queue_deadline,
                    webhook=spec)
    if spec is not None:
        # Set before the job exists in the queue: its first event must find it.
        redis.hset(WEBHOOK_KEY.format(job_id), mapping={
            "url": spec.url, "events": "," + ",".join(spec.events) + ","})
        redis.expire(WEBHOOK_KEY.format(job_id), trace_ttl(result_ttl_s))
    job = queue.create_job(JOB_FUNC, args=(job_id,), job_id=job_id, timeout=timeout_s,
                           result_ttl=result_ttl_s, failure_ttl=result_ttl_s, meta=rec.dump())
    # `queued` goes into the log before a worker can see the job, so its `started`
    # always comes after it.
    events.publish(redis, job_id, EventType.QUEUED,
                   describe(job, queue, refresh=False).model_dump(mode="json"), result_ttl_s)
    fairness.note_owner(redis, queue, job_id, owner)
    job = queue.enqueue_job(job)
    fairness.place(redis, queue, job_id, owner)  # round-robin between keys
    _index(redis, job_id, owner, rec, timeout_s + trace_ttl(result_ttl_s))
    return job


def _index(redis: Redis, job_id: str, owner: str, rec: JobRecord, lasts_s: int) -> None:
    """The owner's index and the deadlines; the index lives as long as its newest job
    can: queued, run, then kept."""
    pipe = redis.pipeline()
    pipe.zadd(OWNER_JOBS_KEY.format(owner), {job_id: time.time()})
    waits = (rec.queue_deadline - time.time()) if rec.queue_deadline is not None else 86400
    pipe.expire(OWNER_JOBS_KEY.format(owner), int(max(0, waits) + lasts_s))
    if (due := rec.due()) is not None:
        pipe.zadd(DEADLINES_KEY, {job_id: due})
    pipe.hincrbyfloat(metrics.METRICS_KEY, "jobs_submitted", 1)
    pipe.execute()


def check_queue_room(redis: Redis, queue: Queue, settings: Settings, owner: str) -> None:
    """429 when the queue holds MAX_QUEUED jobs, or this key MAX_QUEUED_PER_KEY (that
    key's alone: the others still submit)."""
    queued = queue.count
    if queued >= settings.max_queued:
        raise ApiError(429, "queue_full", f"the queue holds {queued} jobs (at most "
                                          f"{settings.max_queued}); retry later",
                       headers={"Retry-After": _retry_after(redis, queue,
                                                            queued - settings.max_queued)})
    mine = fairness.queued_for(redis, queue, owner)
    if mine >= settings.max_queued_per_key:
        raise ApiError(429, "key_queue_full",
                       f"this API key has {mine} jobs queued (at most "
                       f"{settings.max_queued_per_key}, MAX_QUEUED_PER_KEY); retry later",
                       headers={"Retry-After": _retry_after(
                           redis, queue, mine - settings.max_queued_per_key)})


def _retry_after(redis: Redis, queue: Queue, over: int) -> str:
    mean = mean_duration(redis)
    workers = max(1, len(live_workers(redis, queue.name)))
    return str(30 if mean is None else max(1, int(mean * (over + 1) / workers)))


def create(sub: Submission, owner: str, settings: Settings, redis: Redis, queue: Queue,
           storage: Storage, rid: str, lifetime: float | None, key: str | None) -> JobView:
    """Validate, store and enqueue a submission; its view. With an Idempotency-Key seen
    before (with the same body), the job it made instead."""
    auto_masks = not sub.masks and any(w.get("masks")
                                       for w in live_workers(redis, queue.name))
    req = validate_request(sub.prompt, sub.concepts, sub.images, sub.masks, sub.params,
                           settings, auto_masks)
    hook = ([sub.webhook, sorted(e.value for e in sub.webhook_events)] if sub.webhook
            else None)
    digest = body_hash(req, json.dumps([hook, lifetime]))
    if key and (existing := lookup_idempotency(redis, owner, key, digest)):
        return describe(fetch(redis, existing, owner), queue)
    job_id = new_job_id()
    hashes = [hashlib.sha256(u.data).hexdigest() for u in req.images + req.masks]
    now = time.time()
    try:
        _store_inputs(storage, job_id, req)
        job = enqueue(
            queue, job_id, req.params.steps, settings.job_timeout_s, settings.result_ttl_s,
            owner, deadline=None if lifetime is None else now + lifetime,
            queue_deadline=now + settings.queue_ttl_s,
            webhook=Webhook(sub.webhook, sub.webhook_events) if sub.webhook else None,
            legend=legend([c.word for c in req.concepts]), inputs_sha256=hashes,
            batch_key=req.batch_key())
    except (StorageError, RedisError) as e:
        log.warning("request %s: job %s not created: %s", rid, job_id, e)
        _discard(storage, redis, job_id)
        raise ApiError(503, "unavailable", "the job could not be stored or queued "
                                           f"(request {rid})") from None
    if key:
        winner = _claim_key(redis, storage, settings, owner, key, job, digest)
        if winner != job_id:
            return describe(fetch(redis, winner, owner), queue)
    audit.info("job=%s owner=%s request=%s inputs=%s prompt=%r", job_id, owner, rid,
               ",".join(h[:16] for h in hashes), req.prompt)
    return describe(job, queue)


def _store_inputs(storage: Storage, job_id: str, req) -> None:
    storage.put(request_key(job_id), json.dumps(req.record()).encode(), "application/json")
    for i, img in enumerate(req.images):
        storage.put(input_key(job_id, "image", i), img.data, img.content_type)
    for i, m in enumerate(req.masks):
        storage.put(input_key(job_id, "mask", i), m.data, m.content_type)


def _claim_key(redis: Redis, storage: Storage, settings: Settings, owner: str, key: str,
               job: Job, digest: str) -> str:
    """Point the key at the stored, enqueued job; a racing request with the same key
    may have won, and then ours is dropped and theirs returned."""
    ttl = min(settings.idempotency_ttl_s, settings.result_ttl_s)
    try:
        winner = remember_idempotency(redis, owner, key, job.id, digest, ttl)
    except IdempotencyConflict:
        _discard(storage, redis, job.id, job)
        raise
    if winner != job.id:
        _discard(storage, redis, job.id, job)
    return winner


def _discard(storage: Storage, redis: Redis, job_id: str, job: Job | None = None) -> None:
    """Remove a job that will not run: its queue entry and record (and a flag in case
    a worker took it already) and its objects."""
    if job is not None:
        try:
            redis.set(CANCEL_KEY.format(job_id), JobState.CANCELED.value, ex=FLAG_TTL_S)
            purge(redis, job)
        except RedisError:
            pass
    try:
        storage.delete_prefix(job_prefix(job_id))
    except StorageError:
        pass


def idempotency_name(owner: str, key: str) -> str:
    """Each owner's keys are their own; the client's key is hashed (any length, any
    characters)."""
    return IDEMPOTENCY_KEY.format(f"{owner}:{hashlib.sha256(key.encode()).hexdigest()}")


def remember_idempotency(redis: Redis, owner: str, key: str, job_id: str, digest: str,
                         ttl: int) -> str:
    """Point the key at `job_id` unless it already points at a job; return the job it
    points at. Called once the job is stored and enqueued, so the key never names a
    job that does not exist yet."""
    name = idempotency_name(owner, key)
    if redis.set(name, json.dumps({"job_id": job_id, "hash": digest}), nx=True, ex=ttl):
        return job_id
    return lookup_idempotency(redis, owner, key, digest) or job_id


def lookup_idempotency(redis: Redis, owner: str, key: str, digest: str) -> str | None:
    """The live job the key points at, or None (a key whose job expired is dropped).
    Raises IdempotencyConflict when the key was used with another body."""
    name = idempotency_name(owner, key)
    raw = redis.get(name)
    if raw is None:
        return None
    rec = json.loads(raw)
    if rec["hash"] != digest:
        raise IdempotencyConflict(
            "Idempotency-Key was already used with a different request body")
    if not Job.exists(rec["job_id"], connection=redis):
        redis.delete(name)
        return None
    return rec["job_id"]
