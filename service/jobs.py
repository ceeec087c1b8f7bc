"""Job records on RQ: creating, describing and canceling generation jobs.

The canonical state is RQ's job status plus what the worker writes to `job.meta`
(`state`, `progress`, `error`, `result`, `cache`). Shared by gateway and worker;
imports no torch. Raises the job-level exceptions below; the routes map them to HTTP.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from . import events, fairness, metrics
from .keys import (
    CANCEL_KEY,
    DEADLINES_KEY,
    DELETED_KEY,
    DURATION_KEY,
    IDEMPOTENCY_KEY,
    OWNER_JOBS_KEY,
    RETENTION_KEY,
    WEBHOOK_KEY,
    WEBHOOK_LOG_KEY,
)
from .queueing import UNREADABLE_MESSAGE, fetch_job, unreadable
from .schemas import (
    ErrorCode,
    ErrorDetail,
    EventType,
    JobResult,
    JobState,
    JobView,
    LegendEntry,
    Progress,
    Reproducibility,
)
from .workers import live_workers

__all__ = ["JOB_FUNC", "TASK", "JobError", "JobNotFound", "JobFinished", "IdempotencyConflict",
           "new_job_id", "enqueue", "fetch", "status_of", "describe", "cancel",
           "remember_idempotency", "lookup_idempotency", "idempotency_name", "ANONYMOUS",
           "live_workers", "mean_duration", "publish_end", "list_jobs", "delete", "purge",
           "expire", "expire_if_due", "legend", "Webhook", "InvalidCursor", "retain",
           "forget_keys"]

# The worker's job function (the `worker` package of the magicface-server distribution).
TASK = JOB_FUNC = "worker.tasks.generate"
# The owner of jobs made without API keys configured.
ANONYMOUS = "public"
# Job ids are ours (uuid4 hex): anything else is unknown before RQ sees it (RQ refuses
# some strings, e.g. non-ASCII digits, with an exception of its own).
JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobError(Exception):
    """A job-level refusal; `code` is the API error code."""

    code = "job_error"


class JobNotFound(JobError):
    code = "not_found"


class JobFinished(JobError):
    code = "job_finished"


class IdempotencyConflict(JobError):
    code = "idempotency_conflict"


def new_job_id() -> str:
    return uuid.uuid4().hex


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


@dataclass(frozen=True)
class Webhook:
    url: str
    events: frozenset[EventType]


def enqueue(queue: Queue, job_id: str, steps: int, timeout_s: int, result_ttl_s: int,
            owner: str = ANONYMOUS, *, deadline: float | None = None,
            queue_deadline: float | None = None,
            webhook: Webhook | None = None, legend: list[dict] | None = None,
            inputs_sha256: list[str] | None = None, batch_key: str | None = None) -> Job:
    """Queue the job, with its webhook, deadlines and owner index, and append its
    `queued` event. Epoch seconds: unfinished by `deadline` (Cancel-After), or not
    started by `queue_deadline` (QUEUE_TTL_S), the job expires."""
    redis = queue.connection
    ttl = result_ttl_s + 3600
    meta = {"state": JobState.QUEUED.value, "progress": {"step": 0, "total": steps},
            "owner": owner, "legend": legend or [], "inputs_sha256": inputs_sha256 or []}
    if batch_key is not None:
        meta["batch_key"] = batch_key  # workers batch jobs of one key (BATCH_MAX)
    if deadline is not None:
        meta["deadline"] = deadline
    if queue_deadline is not None:
        meta["queue_deadline"] = queue_deadline
    if webhook is not None:
        meta["webhook"] = {"url": webhook.url, "events": sorted(e.value for e in webhook.events)}
        # Set before the job exists in the queue: its first event must find it.
        redis.hset(WEBHOOK_KEY.format(job_id), mapping={
            "url": webhook.url, "events": "," + ",".join(e.value for e in webhook.events) + ","})
        redis.expire(WEBHOOK_KEY.format(job_id), ttl)
    job = queue.create_job(JOB_FUNC, args=(job_id,), job_id=job_id, timeout=timeout_s,
                           result_ttl=result_ttl_s, failure_ttl=result_ttl_s, meta=meta)
    # `queued` goes into the log before a worker can see the job, so its `started`
    # always comes after it.
    events.publish(redis, job_id, EventType.QUEUED,
                   describe(job, queue, refresh=False).model_dump(mode="json"), ttl)
    fairness.note_owner(redis, queue, job_id, owner)
    job = queue.enqueue_job(job)
    fairness.place(redis, queue, job_id, owner)  # round-robin between keys
    pipe = redis.pipeline()
    pipe.zadd(OWNER_JOBS_KEY.format(owner), {job_id: time.time()})
    # The index lives as long as its newest job can: queued, run, then kept.
    waits = (queue_deadline - time.time()) if queue_deadline is not None else 86400
    pipe.expire(OWNER_JOBS_KEY.format(owner), int(max(0, waits) + timeout_s + ttl))
    due = [d for d in (deadline, queue_deadline) if d is not None]
    if due:
        pipe.zadd(DEADLINES_KEY, {job_id: min(due)})
    pipe.hincrbyfloat(metrics.METRICS_KEY, "jobs_submitted", 1)
    pipe.execute()
    return job


def fetch(redis: Redis, job_id: str, owner: str | None = None) -> Job:
    """The job, if it exists and (with `owner`) belongs to that owner: another owner's
    job is as unknown as a missing one."""
    missing = JobNotFound(f"job {job_id[:64]!r} does not exist")
    if not JOB_ID.fullmatch(job_id or ""):
        raise missing
    try:
        job = fetch_job(job_id, redis)
    except NoSuchJobError:
        raise missing from None
    if owner is not None and not _owns(redis, job, owner):
        raise missing
    if redis.exists(DELETED_KEY.format(job_id)):
        raise missing
    return job


def _owns(redis: Redis, job: Job, owner: str) -> bool:
    """Whether `owner` owns the job; for a job whose meta is unreadable, whether the
    owner's index holds it (so its owner, and only its owner, is told it is unreadable)."""
    if not unreadable(job):
        return job.meta.get("owner", ANONYMOUS) == owner
    return redis.zscore(OWNER_JOBS_KEY.format(owner), job.id) is not None


UNREADABLE = ErrorDetail(code=ErrorCode.UNREADABLE_JOB, message=UNREADABLE_MESSAGE)


def _failure_error(job: Job) -> ErrorDetail:
    meta_error = job.meta.get("error")
    if meta_error:
        return ErrorDetail(**meta_error)
    exc = ""
    try:
        res = job.latest_result()
        exc = (res.exc_string or "") if res is not None else ""
    except Exception:  # noqa: BLE001 - an unreadable result still fails the job
        exc = ""
    if "DeserializationError" in exc or "UnreadableRecord" in exc:
        return UNREADABLE
    if "AbandonedJobError" in exc:
        return ErrorDetail(code=ErrorCode.WORKER_LOST,
                           message="the worker running this job stopped before finishing")
    if "SystemExit" in exc or "ShutDownImminentException" in exc:
        return ErrorDetail(code=ErrorCode.WORKER_LOST,
                           message="the worker shut down before finishing this job")
    if "JobTimeoutException" in exc:
        return ErrorDetail(code=ErrorCode.TIMEOUT, message="the job exceeded its time limit")
    return ErrorDetail(code=ErrorCode.INTERNAL_ERROR, message="the job failed unexpectedly")


def status_of(job: Job) -> JobState:
    if unreadable(job):
        return JobState.FAILED  # never run: a worker fails it when it meets it
    rq_status = job.get_status(refresh=False)
    state = job.meta.get("state")
    if state == JobState.EXPIRED:
        return JobState.EXPIRED
    if state == JobState.CANCELED or rq_status == JobStatus.CANCELED:
        return JobState.CANCELED
    if rq_status in (JobStatus.FAILED, JobStatus.STOPPED):
        return JobState.FAILED
    if rq_status == JobStatus.FINISHED:
        return JobState.SUCCEEDED  # a job canceled or expired mid-run also finishes
    if rq_status == JobStatus.STARTED:
        return JobState.RUNNING
    return JobState.QUEUED


def retain(redis: Redis, job: Job, record_ttl_s: int) -> None:
    """Index an ended job for the sweeper: everything of it goes `record_ttl_s` from now
    (the first end counts: a later call does not push the expiry back). The member
    names the owner too, whose index the sweeper must clean after the record is gone."""
    owner = job.meta.get("owner", ANONYMOUS)  # unreadable meta holds no owner: ANONYMOUS
    redis.zadd(RETENTION_KEY, {retention_member(job.id, owner): time.time() + record_ttl_s},
               nx=True)


def retention_member(job_id: str, owner: str) -> str:
    return f"{job_id}:{owner}"


def publish_end(redis: Redis, job: Job, queue: Queue, record_ttl_s: int) -> bool:
    """The job's terminal event with its final view, if the job has ended (once per
    job: later calls are no-ops). True when the job has ended."""
    job.refresh()
    view = describe(job, queue, refresh=False)
    if not view.status.terminal:
        return False
    retain(redis, job, record_ttl_s)
    events.publish(redis, job.id, EventType(view.status.value),
                   view.model_dump(mode="json"), record_ttl_s + 3600)
    return True


def mean_duration(redis: Redis) -> float | None:
    count, total = redis.hmget(DURATION_KEY, "count", "sum")
    if not count or float(count) <= 0:
        return None
    return float(total) / float(count)


def legend(words: list[str]) -> list[dict]:
    """Each concept's tint in the semantic map (the palette the worker draws with)."""
    from magicface_core.overlay import concept_color

    return [{"word": w, "color": "#{:02x}{:02x}{:02x}".format(*concept_color(i))}
            for i, w in enumerate(words)]


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(float(epoch), tz=timezone.utc)


def _stage(status: JobState, progress: dict) -> str:
    if status == JobState.QUEUED:
        return "queued"
    if status.terminal:
        return "done"
    return progress.get("stage") or "loading"


def describe(job: Job, queue: Queue, *, refresh: bool = True) -> JobView:
    """The job as the API shows it. A record that is not this service's (unreadable
    meta, or JSON of the wrong shape: written by hand into Redis) reads as failed with
    `unreadable_job`, never as a server error."""
    if refresh:
        job.refresh()
    if not unreadable(job):
        try:
            return _describe(job, queue)
        except (TypeError, ValueError, KeyError, AttributeError):  # pydantic's too
            pass
    return JobView(id=job.id, status=JobState.FAILED,
                   progress=Progress(step=0, total=0, stage="done"),
                   created_at=_utc(job.created_at), error=UNREADABLE)


def _describe(job: Job, queue: Queue) -> JobView:
    meta = job.meta
    status = status_of(job)
    if status == JobState.RUNNING and queue.connection.exists(CANCEL_KEY.format(job.id)):
        status = JobState.CANCEL_REQUESTED  # the flag stops it at its next step
    p = meta.get("progress") or {"step": 0, "total": 0}
    step, total = int(p.get("step", 0)), int(p.get("total", 0))
    if status == JobState.SUCCEEDED:
        step = total
    progress = Progress(step=step, total=total,
                        percent=round(100.0 * step / total, 1) if total else 0.0,
                        eta_s=None if status.terminal else p.get("eta_s"),
                        stage=_stage(status, p))
    position = eta = None
    if status == JobState.QUEUED:
        position = queue.get_job_position(job.id)
        mean = mean_duration(queue.connection)
        if position is not None and mean is not None:
            workers = max(1, len(live_workers(queue.connection, queue.name)))
            # The jobs ahead, shared among the workers, then this one.
            eta = round((position // workers + 1) * mean, 1)
    elif not status.terminal:
        eta = progress.eta_s
    result = None
    if status == JobState.SUCCEEDED:
        has_map = (meta.get("result") or {}).get("semantic_map")
        result = JobResult(image_url=f"/v1/jobs/{job.id}/image",
                           semantic_map_url=f"/v1/jobs/{job.id}/semantic_map" if has_map
                           else None,
                           semantic_map_legend=[LegendEntry(**e) for e in meta.get("legend", [])]
                           if has_map else [])
    error = None
    if status == JobState.FAILED:
        error = _failure_error(job)
    elif status == JobState.EXPIRED:
        error = ErrorDetail(code=ErrorCode.DEADLINE_EXCEEDED,
                            message="the job's deadline passed before it finished")
    elif status == JobState.CANCELED:
        error = ErrorDetail(code=ErrorCode.CANCELED, message="the job was canceled")
    repro = meta.get("reproducibility")
    hook = meta.get("webhook")
    return JobView(
        id=job.id, status=status, progress=progress, queue_position=position, eta_s=eta,
        created_at=_utc(job.created_at), started_at=_utc(job.started_at),
        finished_at=_utc(job.ended_at or _ts(meta.get("ended_at"))) if status.terminal
        else None,
        deadline=_ts(meta.get("deadline")), error=error, result=result,
        cache=meta.get("cache"),
        reproducibility=Reproducibility(input_sha256=meta.get("inputs_sha256", []),
                                        **(repro or {})),
        webhook=hook["url"] if hook else None,
        webhook_events=hook["events"] if hook else None)


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
    redis.set(CANCEL_KEY.format(job.id), state.value, ex=86400)
    if status == JobState.QUEUED:
        job.meta["state"] = state.value
        job.meta["ended_at"] = time.time()
        job.save_meta()
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
                       describe(job, queue).model_dump(mode="json"), record_ttl_s + 3600)
        return True
    return False


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
        except NoSuchJobError:
            continue
        status = status_of(job)
        deadline = job.meta.get("deadline")
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
    meta = job.meta
    due = [float(d) for d in (meta.get("deadline"), meta.get("queue_deadline")) if d is not None]
    if not due or time.time() < min(due) or status_of(job) != JobState.QUEUED:
        return
    try:
        cancel(redis, job, record_ttl_s, queue, state=JobState.EXPIRED)
    except JobFinished:
        pass


def list_jobs(redis: Redis, queue: Queue, owner: str, *, limit: int = 20,
              cursor: str | None = None, status: JobState | None = None
              ) -> tuple[list[JobView], str | None]:
    """The owner's jobs, newest first; `cursor` is the previous page's next_cursor.
    Jobs whose record has expired are dropped from the index as they are met."""
    key = OWNER_JOBS_KEY.format(owner)
    top = "+inf" if cursor is None else f"({_decode_cursor(cursor)}"
    out: list[JobView] = []
    next_cursor = None
    while len(out) < limit:
        rows = redis.zrevrangebyscore(key, top, "-inf", start=0, num=limit * 2,
                                      withscores=True)
        if not rows:
            break
        for raw, score in rows:
            top = f"({score!r}"
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            try:
                job = fetch_job(job_id, redis)
            except NoSuchJobError:
                redis.zrem(key, job_id)
                continue
            view = describe(job, queue, refresh=False)
            if status is None or view.status == status:
                out.append(view)
            if len(out) == limit:
                next_cursor = _encode_cursor(score)
                break
    return out, next_cursor


def _encode_cursor(score: float) -> str:
    return repr(float(score))


def _decode_cursor(cursor: str) -> float:
    try:
        value = float(cursor)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "nan" parses, and Redis then refuses the range
        raise InvalidCursor("cursor: not a cursor this API returned")
    return value


class InvalidCursor(JobError):
    code = "invalid_cursor"


def delete(redis: Redis, job: Job, owner: str) -> bool:
    """Delete the job: its record, events, webhook state and index entry (the caller
    removes its storage objects). A running job is hidden at once and stopped at its
    next step; its worker removes it then (False is returned)."""
    jid = job.id
    job.refresh()
    if status_of(job) in (JobState.RUNNING, JobState.CANCEL_REQUESTED):
        redis.set(DELETED_KEY.format(jid), "1", ex=86400)
        redis.set(CANCEL_KEY.format(jid), JobState.CANCELED.value, ex=86400)
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
    forget_keys(redis, jid, job.meta.get("owner", ANONYMOUS))


def forget_keys(redis: Redis, job_id: str, owner: str) -> None:
    """Remove the job's own Redis keys and index entries (its RQ record aside): what
    `purge` does after the record, and all the sweeper can do once RQ's TTL took the
    record first. The retention entry goes last, so a failure leaves it to retry."""
    redis.delete(events.events_key(job_id), events.events_key(job_id) + ":terminal",
                 WEBHOOK_KEY.format(job_id), WEBHOOK_LOG_KEY.format(job_id),
                 CANCEL_KEY.format(job_id))
    redis.zrem(OWNER_JOBS_KEY.format(owner), job_id)
    redis.zrem(DEADLINES_KEY, job_id)
    redis.zrem(RETENTION_KEY, retention_member(job_id, owner))


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
