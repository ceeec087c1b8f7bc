"""Job records on RQ: creating, describing and canceling generation jobs.

The canonical state is RQ's job status plus what the worker writes to `job.meta`
(`state`, `progress`, `error`, `result`, `cache`). Shared by gateway and worker;
imports no torch. Raises the job-level exceptions below; the routes map them to HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from . import metrics
from .keys import CANCEL_KEY, IDEMPOTENCY_KEY
from .schemas import ErrorCode, ErrorDetail, JobResult, JobState, JobView, Progress

__all__ = ["JOB_FUNC", "JobError", "JobNotFound", "JobFinished", "IdempotencyConflict",
           "new_job_id", "enqueue", "fetch", "status_of", "describe", "cancel",
           "remember_idempotency", "lookup_idempotency", "idempotency_name", "ANONYMOUS"]

JOB_FUNC = "worker.tasks.generate"
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


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat().replace("+00:00", "Z")


def enqueue(queue: Queue, job_id: str, steps: int, timeout_s: int, result_ttl_s: int,
            owner: str = ANONYMOUS) -> Job:
    return queue.enqueue(
        JOB_FUNC, job_id, job_id=job_id, job_timeout=timeout_s, result_ttl=result_ttl_s,
        failure_ttl=result_ttl_s,
        meta={"state": JobState.QUEUED.value, "progress": {"step": 0, "total": steps},
              "owner": owner},
    )


def fetch(redis: Redis, job_id: str, owner: str | None = None) -> Job:
    """The job, if it exists and (with `owner`) belongs to that owner: another owner's
    job is as unknown as a missing one."""
    missing = JobNotFound(f"job {job_id[:64]!r} does not exist")
    if not JOB_ID.fullmatch(job_id or ""):
        raise missing
    try:
        job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        raise missing from None
    if owner is not None and job.meta.get("owner", ANONYMOUS) != owner:
        raise missing
    return job


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
    rq_status = job.get_status(refresh=False)
    if job.meta.get("state") == JobState.CANCELED or rq_status == JobStatus.CANCELED:
        return JobState.CANCELED
    if rq_status in (JobStatus.FAILED, JobStatus.STOPPED):
        return JobState.FAILED
    if rq_status == JobStatus.FINISHED:
        return JobState.SUCCEEDED  # a job canceled mid-run also finishes; see above
    if rq_status == JobStatus.STARTED:
        return JobState.RUNNING
    return JobState.QUEUED


def describe(job: Job, queue: Queue) -> JobView:
    job.refresh()
    status = status_of(job)
    progress = job.meta.get("progress") or {"step": 0, "total": 0}
    result = None
    if status == JobState.SUCCEEDED:
        has_map = (job.meta.get("result") or {}).get("semantic_map")
        result = JobResult(image_url=f"/v1/jobs/{job.id}/image",
                           semantic_map_url=f"/v1/jobs/{job.id}/semantic_map" if has_map
                           else None)
    return JobView(
        id=job.id, status=status,
        progress=Progress(step=int(progress.get("step", 0)),
                          total=int(progress.get("total", 0))),
        queue_position=queue.get_job_position(job.id) if status == JobState.QUEUED else None,
        created_at=_iso(job.created_at), started_at=_iso(job.started_at),
        finished_at=_iso(job.ended_at) if status.terminal else None,
        error=_failure_error(job) if status == JobState.FAILED else None,
        result=result, cache=job.meta.get("cache"))


def cancel(redis: Redis, job: Job, record_ttl_s: int) -> bool:
    """Stop a job: at once when queued (its record then expires after `record_ttl_s`,
    as a finished job's does), at its next step when running. True when it was
    canceled while queued (it will never run)."""
    job.refresh()
    status = status_of(job)
    if status.terminal:
        raise JobFinished(f"job {job.id} is already {status.value}")
    # The flag stops a running job at its next step; it also catches a job that a
    # worker dequeues between our status read and the cancel below.
    redis.set(CANCEL_KEY.format(job.id), "1", ex=86400)
    if status == JobState.QUEUED:
        job.meta["state"] = JobState.CANCELED.value
        job.save_meta()
        try:
            job.cancel()
        except Exception:  # noqa: BLE001 - already dequeued: the flag stops it
            return False
        redis.expire(job.key, record_ttl_s)
        metrics.count(redis, "jobs_canceled")
        return True
    return False


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
