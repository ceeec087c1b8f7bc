"""Reading jobs: fetch one (owner-checked), its status, its view as the API shows it,
and an owner's jobs page by page. Writes nothing but the owner index's dead entries."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from .. import records
from ..keys import CANCEL_KEY, DELETED_KEY, DURATION_KEY, OWNER_JOBS_KEY
from ..queueing import UNREADABLE_MESSAGE, fetch_job
from ..records import JobRecord, UnreadableRecord
from ..schemas import (
    ErrorCode,
    ErrorDetail,
    JobResult,
    JobState,
    JobView,
    Progress,
    Reproducibility,
)
from ..workers import live_workers
from .errors import InvalidCursor, JobNotFound

__all__ = ["fetch", "status_of", "describe", "list_jobs", "mean_duration", "UNREADABLE",
           "JOB_ID"]

# Job ids are ours (uuid4 hex): anything else is unknown before RQ sees it (RQ refuses
# some strings, e.g. non-ASCII digits, with an exception of its own).
JOB_ID = re.compile(r"[0-9a-f]{32}")
UNREADABLE = ErrorDetail(code=ErrorCode.UNREADABLE_JOB, message=UNREADABLE_MESSAGE)


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
    """Whether `owner` owns the job; for a job whose record is unreadable, whether the
    owner's index holds it (so its owner, and only its owner, is told it is unreadable)."""
    try:
        return records.read(job).owner == owner
    except UnreadableRecord:
        return redis.zscore(OWNER_JOBS_KEY.format(owner), job.id) is not None


def _failure_error(job: Job, rec: JobRecord) -> ErrorDetail:
    """The worker's explanation, else what RQ's recorded exception says."""
    if rec.error is not None:
        return rec.error
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
    try:
        state = records.read(job).state
    except UnreadableRecord:
        return JobState.FAILED  # never run: a worker fails it when it meets it
    rq_status = job.get_status(refresh=False)
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


def mean_duration(redis: Redis) -> float | None:
    count, total = redis.hmget(DURATION_KEY, "count", "sum")
    if not count or float(count) <= 0:
        return None
    return float(total) / float(count)


def describe(job: Job, queue: Queue, *, refresh: bool = True) -> JobView:
    """The job as the API shows it. A record that is not this service's (unreadable
    meta, or JSON of the wrong shape: written by hand into Redis) reads as failed with
    `unreadable_job`, never as a server error."""
    if refresh:
        job.refresh()
    try:
        return _describe(job, records.read(job), queue)
    except (UnreadableRecord, TypeError, ValueError, KeyError, AttributeError):
        return JobView(id=job.id, status=JobState.FAILED,
                       progress=Progress(step=0, total=0, stage="done"),
                       created_at=_utc(job.created_at), error=UNREADABLE)


def _describe(job: Job, rec: JobRecord, queue: Queue) -> JobView:
    status = status_of(job)
    if status == JobState.RUNNING and queue.connection.exists(CANCEL_KEY.format(job.id)):
        status = JobState.CANCEL_REQUESTED  # the flag stops it at its next step
    progress = _progress(status, rec)
    position = eta = None
    if status == JobState.QUEUED:
        position, eta = _queue_place(job, queue)
    elif not status.terminal:
        eta = progress.eta_s
    hook = rec.webhook
    return JobView(
        id=job.id, status=status, progress=progress, queue_position=position, eta_s=eta,
        created_at=_utc(job.created_at), started_at=_utc(job.started_at),
        finished_at=_utc(job.ended_at or _ts(rec.ended_at)) if status.terminal else None,
        deadline=_ts(rec.deadline), error=_error(job, rec, status),
        result=_result(job.id, rec) if status == JobState.SUCCEEDED else None,
        cache=rec.cache,
        reproducibility=Reproducibility(input_sha256=rec.inputs_sha256,
                                        **rec.reproducibility),
        webhook=hook.url if hook else None, webhook_events=hook.events if hook else None)


def _progress(status: JobState, rec: JobRecord) -> Progress:
    p = rec.progress
    step, total = p.step, p.total
    if status == JobState.SUCCEEDED:
        step = total
    if status == JobState.QUEUED:
        stage = "queued"
    elif status.terminal:
        stage = "done"
    else:
        stage = p.stage or "loading"
    return Progress(step=step, total=total,
                    percent=round(100.0 * step / total, 1) if total else 0.0,
                    eta_s=None if status.terminal else p.eta_s, stage=stage)


def _queue_place(job: Job, queue: Queue) -> tuple[int | None, float | None]:
    """The job's place in the queue and when it should end: the jobs ahead, shared
    among the live workers, then this one."""
    position = queue.get_job_position(job.id)
    mean = mean_duration(queue.connection)
    if position is None or mean is None:
        return position, None
    workers = max(1, len(live_workers(queue.connection, queue.name)))
    return position, round((position // workers + 1) * mean, 1)


def _result(job_id: str, rec: JobRecord) -> JobResult:
    has_map = bool((rec.result or {}).get("semantic_map"))
    return JobResult(image_url=f"/v1/jobs/{job_id}/image",
                     semantic_map_url=f"/v1/jobs/{job_id}/semantic_map" if has_map else None,
                     semantic_map_legend=rec.legend if has_map else [])


def _error(job: Job, rec: JobRecord, status: JobState) -> ErrorDetail | None:
    if status == JobState.FAILED:
        return _failure_error(job, rec)
    if status == JobState.EXPIRED:
        return ErrorDetail(code=ErrorCode.DEADLINE_EXCEEDED,
                           message="the job's deadline passed before it finished")
    if status == JobState.CANCELED:
        return ErrorDetail(code=ErrorCode.CANCELED, message="the job was canceled")
    return None


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
                next_cursor = repr(float(score))
                break
    return out, next_cursor


def _decode_cursor(cursor: str) -> float:
    try:
        value = float(cursor)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "nan" parses, and Redis then refuses the range
        raise InvalidCursor("cursor: not a cursor this API returned")
    return value


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(float(epoch), tz=timezone.utc)
