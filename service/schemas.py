"""The job vocabulary and the API's response models (the OpenAPI document)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel

__all__ = ["JobState", "ErrorCode", "ErrorDetail", "ErrorBody", "Progress", "JobResult",
           "CacheReport", "JobView"]


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


class ErrorCode(str, Enum):
    """Why a job failed (`error.code` of a failed job)."""

    INVALID_INPUT = "invalid_input"  # the request, as the worker found it, is wrong
    OUT_OF_MEMORY = "out_of_memory"  # CUDA OOM; the worker frees memory and goes on
    STORAGE_ERROR = "storage_error"  # inputs unreadable or results not stored
    TIMEOUT = "timeout"  # over JOB_TIMEOUT_S
    WORKER_LOST = "worker_lost"  # the worker died mid-job
    UNSAFE_CONTENT = "unsafe_content"  # SAFETY_CHECKER=block flagged the image
    INTERNAL_ERROR = "internal_error"  # anything else


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Progress(BaseModel):
    step: int
    total: int


class JobResult(BaseModel):
    image_url: str
    semantic_map_url: str | None = None


class CacheReport(BaseModel):
    hits: int
    misses: int


class JobView(BaseModel):
    id: str
    status: JobState
    progress: Progress
    queue_position: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: ErrorDetail | None = None
    result: JobResult | None = None
    cache: CacheReport | None = None
