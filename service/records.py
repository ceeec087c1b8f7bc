"""A job's record: what the gateway and the worker keep beside RQ's own fields (in the
job's `meta`), as one typed model, read and written only here.

RQ stores `meta` as JSON (`queueing.JobSerializer`). Anything in Redis may have been
written by someone else, so a record is validated when read: a meta that is not JSON
(RQ keeps its raw bytes under `unserialized`) or not of this shape is `UnreadableRecord`,
which the API shows as a failed job (`unreadable_job`), never as a server error.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rq.job import Job

from .schemas import ErrorDetail, JobState, LegendEntry

__all__ = ["ANONYMOUS", "JobRecord", "StepProgress", "WebhookSpec", "UnreadableRecord",
           "read", "write", "unreadable", "owner_of", "batch_key_of", "MaskRecord",
           "read_mask"]

# The owner of jobs made without API keys configured.
ANONYMOUS = "public"


class UnreadableRecord(ValueError):
    """The job's meta is not a record of this service."""


class StepProgress(BaseModel):
    """The worker's last report: the step done and, while it runs, its pace."""

    model_config = ConfigDict(extra="ignore")

    step: int = 0
    total: int = 0
    percent: float | None = None
    eta_s: float | None = None
    s_per_step: float | None = None
    stage: str | None = None  # loading, rsa, rba, saving


class WebhookSpec(BaseModel):
    url: str
    events: list[str]


class JobRecord(BaseModel):
    """`state` is what the worker (or a cancel) last wrote; the API's status combines it
    with RQ's (`jobs.queries.status_of`). Epoch seconds throughout."""

    model_config = ConfigDict(extra="ignore")

    state: JobState = JobState.QUEUED
    progress: StepProgress = Field(default_factory=StepProgress)
    owner: str = ANONYMOUS
    legend: list[LegendEntry] = Field(default_factory=list)
    inputs_sha256: list[str] = Field(default_factory=list)
    batch_key: str | None = None  # workers batch queued jobs of one key (BATCH_MAX)
    deadline: float | None = None  # Cancel-After: unfinished by then, it expires
    queue_deadline: float | None = None  # QUEUE_TTL_S: not started by then, it expires
    webhook: WebhookSpec | None = None
    error: ErrorDetail | None = None  # a failure the worker explained
    # The model, versions, seed, parameters and timings that made the image; grows as
    # the job runs (timings_s), so a mapping rather than a closed model.
    reproducibility: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, str] | None = None  # output name -> storage key
    cache: dict[str, int] | None = None  # reference K/V cache hits and misses
    duration_s: float | None = None
    flagged: bool = False  # SAFETY_CHECKER=warn flagged the image
    ended_at: float | None = None  # set when the gateway ends a queued job

    def due(self) -> float | None:
        """The earliest deadline, if any."""
        due = [d for d in (self.deadline, self.queue_deadline) if d is not None]
        return min(due) if due else None

    def dump(self) -> dict[str, Any]:
        """The record as stored (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


def unreadable(job: Job) -> bool:
    """Whether the job's meta could not be read as JSON (RQ then keeps the raw bytes
    under the single key `unserialized`, and writes them back unchanged on save)."""
    return set(job.meta) == {"unserialized"}


def _validated(job: Job, model: type[BaseModel], what: str) -> Any:
    """The job's meta as `model`, as last fetched (no Redis round trip)."""
    if unreadable(job):
        raise UnreadableRecord(f"{what} {job.id}: its record is not JSON")
    try:
        return model.model_validate(job.meta)
    except ValidationError as e:
        raise UnreadableRecord(f"{what} {job.id}: its record has the wrong shape") from e


def read(job: Job) -> JobRecord:
    """The job's record as last fetched (no Redis round trip)."""
    return _validated(job, JobRecord, "job")


def write(job: Job, record: JobRecord) -> None:
    """Store the record (the whole meta, as RQ's `save_meta` does)."""
    job.meta = record.dump()
    job.save_meta()


def owner_of(job: Job) -> str:
    """The job's owner; ANONYMOUS for a record that cannot be read (it holds none)."""
    try:
        return read(job).owner
    except UnreadableRecord:
        return ANONYMOUS


def batch_key_of(job: Job) -> str | None:
    try:
        return read(job).batch_key
    except UnreadableRecord:
        return None


class MaskRecord(BaseModel):
    """A mask proposal's record (its input and result travel as the RQ job's JSON
    argument and return value)."""

    model_config = ConfigDict(extra="ignore")

    owner: str = ANONYMOUS
    word: str = ""

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def read_mask(job: Job) -> MaskRecord:
    return _validated(job, MaskRecord, "mask")
