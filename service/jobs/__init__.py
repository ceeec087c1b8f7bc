"""Generation jobs on RQ, by concern: `submit` (queue room, validation, inputs stored,
enqueue, Idempotency-Key), `queries` (fetch, status, the API's view, listing),
`lifecycle` (terminal event, cancel, expiry, delete, purge, retention), `events` (each
job's event stream and the SSE follow), `deliveries` (the webhook log), `outputs`
(downloads). The canonical state is RQ's job status plus the job's record
(`service.records.JobRecord`). Imports no torch; raises the job-level errors in
`errors`, which the routes map to HTTP.

The names below are the package's API for the gateway, the workers and the sweeper.
"""

from __future__ import annotations

from ..records import ANONYMOUS
from ..workers import live_workers
from . import deliveries, events, lifecycle, outputs, queries, submit
from .errors import IdempotencyConflict, InvalidCursor, JobError, JobFinished, JobNotFound
from .lifecycle import (
    cancel,
    delete,
    expire,
    expire_if_due,
    forget_keys,
    publish_end,
    purge,
    reconcile,
    retain,
)
from .queries import describe, fetch, list_jobs, mean_duration, status_of
from .submit import (
    JOB_FUNC,
    TASK,
    Webhook,
    create,
    enqueue,
    idempotency_name,
    legend,
    lookup_idempotency,
    new_job_id,
    remember_idempotency,
)

__all__ = ["ANONYMOUS", "JOB_FUNC", "TASK", "JobError", "JobNotFound", "JobFinished",
           "IdempotencyConflict", "InvalidCursor", "Webhook", "new_job_id", "enqueue",
           "create", "fetch", "status_of", "describe", "cancel", "remember_idempotency",
           "lookup_idempotency", "idempotency_name", "live_workers", "mean_duration",
           "publish_end", "list_jobs", "delete", "purge", "expire", "expire_if_due",
           "legend", "retain", "forget_keys", "reconcile", "deliveries", "events",
           "lifecycle", "outputs", "queries", "submit"]
