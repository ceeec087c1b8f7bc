"""The job-level refusals; the gateway maps each `code` to an HTTP status
(`api.routes.jobs.JOB_ERROR_STATUS`)."""

from __future__ import annotations

__all__ = ["JobError", "JobNotFound", "JobFinished", "IdempotencyConflict", "InvalidCursor"]


class JobError(Exception):
    """A job-level refusal; `code` is the API error code."""

    code = "job_error"


class JobNotFound(JobError):
    code = "not_found"


class JobFinished(JobError):
    code = "job_finished"


class IdempotencyConflict(JobError):
    code = "idempotency_conflict"


class InvalidCursor(JobError):
    code = "invalid_cursor"
