"""The job vocabulary and the API's models (the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["JobState", "ErrorCode", "ErrorDetail", "ErrorBody", "Progress", "LegendEntry",
           "JobResult", "CacheReport", "Reproducibility", "JobView", "JobList",
           "WebhookDelivery", "WebhookDeliveries", "EventType", "TERMINAL_EVENTS"]


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"  # a running job stops at its next step
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"  # its deadline (Cancel-After, QUEUE_TTL_S) passed first

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED,
                        JobState.EXPIRED)


class EventType(str, Enum):
    """The events of a job's stream (SSE `event:`) and of its webhooks (`job.<type>`)."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


TERMINAL_EVENTS = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED,
                             EventType.EXPIRED})


class ErrorCode(str, Enum):
    """Why a job failed (`error.code` of a failed job)."""

    INVALID_INPUT = "invalid_input"  # the request, as the worker found it, is wrong
    OUT_OF_MEMORY = "out_of_memory"  # CUDA OOM; the worker frees memory and goes on
    STORAGE_ERROR = "storage_error"  # inputs unreadable or results not stored
    TIMEOUT = "timeout"  # over JOB_TIMEOUT_S
    WORKER_LOST = "worker_lost"  # the worker died mid-job
    UNSAFE_CONTENT = "unsafe_content"  # SAFETY_CHECKER=block flagged the image
    UNREADABLE_JOB = "unreadable_job"  # its Redis record is not JSON (pickle): never run
    DEADLINE_EXCEEDED = "deadline_exceeded"  # Cancel-After or QUEUE_TTL_S passed (expired)
    CANCELED = "canceled"  # the client canceled it
    INTERNAL_ERROR = "internal_error"  # anything else


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable machine-readable code, e.g. invalid_concepts")
    message: str = Field(description="what is wrong, naming the field")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Progress(BaseModel):
    step: int = Field(description="sampling steps done")
    total: int = Field(description="sampling steps in all")
    percent: float = Field(0.0, description="step / total, 0-100")
    eta_s: float | None = Field(None, description="seconds left, from the worker's "
                                                  "measured seconds per step")
    stage: str | None = Field(None, description="queued, loading, rsa, rba, saving or done")


class LegendEntry(BaseModel):
    word: str
    color: str = Field(description="#rrggbb: the concept's tint in the semantic map")


class JobResult(BaseModel):
    image_url: str
    semantic_map_url: str | None = None
    semantic_map_legend: list[LegendEntry] = Field(default_factory=list)


class CacheReport(BaseModel):
    hits: int
    misses: int


class Reproducibility(BaseModel):
    """What it takes to make the same image again (filled in as the job runs)."""

    seed: int | None = None
    reference_seed: int | None = None
    preset: str | None = None
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the parameters as run, preset values "
                                               "filled in")
    model: str | None = None
    weights_sha256: str | None = Field(None, description="hash of the loaded weights")
    library_version: str | None = None
    input_sha256: list[str] = Field(default_factory=list,
                                    description="images, then masks, in order")
    timings_s: dict[str, float] = Field(default_factory=dict,
                                        description="seconds per stage: load, sample, "
                                                    "store")
    duration_s: float | None = None
    mask_sources: list[str] | None = Field(
        None, description="per concept, when the job came without masks: how its mask "
                          "was proposed (face+sam, detector+sam, face+ellipse, ...)")


class JobView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2a9c0d8e7b4a6f9c1d2e3f4a5b6c7d", "status": "succeeded",
        "progress": {"step": 50, "total": 50, "percent": 100.0, "eta_s": None,
                     "stage": "done"},
        "created_at": "2026-11-26T10:00:00Z", "started_at": "2026-11-26T10:00:01Z",
        "finished_at": "2026-11-26T10:00:04Z",
        "result": {"image_url": "/v1/jobs/3f2a9c0d8e7b4a6f9c1d2e3f4a5b6c7d/image",
                   "semantic_map_url": "/v1/jobs/3f2a9c0d8e7b4a6f9c1d2e3f4a5b6c7d/"
                                       "semantic_map",
                   "semantic_map_legend": [{"word": "man", "color": "#e6194b"}]}}]})

    id: str
    status: JobState
    progress: Progress
    queue_position: int | None = Field(None, description="0: next to run")
    eta_s: float | None = Field(None, description="seconds until the job should finish: "
                                                  "queue wait plus sampling")
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = Field(None, description="Cancel-After or the queue TTL: "
                                                        "unfinished by then, it expires")
    error: ErrorDetail | None = None
    result: JobResult | None = None
    cache: CacheReport | None = None
    reproducibility: Reproducibility | None = None
    webhook: str | None = None
    webhook_events: list[EventType] | None = None


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class WebhookDelivery(BaseModel):
    id: str = Field(description="the webhook-id header (the same on every retry)")
    event: EventType
    event_id: str
    status: str = Field(description="pending, delivered or failed (retries exhausted)")
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None


class WebhookDeliveries(BaseModel):
    deliveries: list[WebhookDelivery]


class FieldLimit(BaseModel):
    """A numeric field's range: [min, max] (or (min, max] with min_exclusive)."""

    min: int | float
    max: int | float
    min_exclusive: bool = False
    multiple_of: int | None = None
    default: int | float | None = Field(None, description="the value when the field is "
                                                          "absent")


class ImageLimits(BaseModel):
    max_pixels: int = Field(description="width x height of a reference image or mask")
    max_bytes: int = Field(description="an uploaded (or fetched) image's encoded size")
    formats: list[str]


class Limits(BaseModel):
    """What this gateway accepts, as configured: check a request against it before
    uploading (the same table the library and the CLI check with)."""

    concepts: FieldLimit = Field(description="concepts per job")
    params: dict[str, FieldLimit] = Field(description="each numeric `params` field")
    concept: dict[str, FieldLimit] = Field(description="each numeric concept field")
    text: dict[str, int] = Field(description="longest strings, in characters")
    image: ImageLimits
    presets: list[str]
    default_preset: str
    max_request_bytes: int
    max_wait_s: int = Field(description="the longest `Prefer: wait=N`")


class MaskStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class MaskProposalResult(BaseModel):
    mask: str = Field(description="the mask as a data:image/png;base64 URI, the "
                                  "reference's size, white = the concept")
    box: list[int] = Field(description="[x0, y0, x1, y1] in the image's pixels: what "
                                       "was found")
    score: float = Field(description="the detector's confidence, 0-1")
    source: str = Field(description="how it was made: detector+sam, face+sam, "
                                    "face+ellipse, detector+ellipse")


class MaskView(BaseModel):
    id: str
    status: MaskStatus
    word: str
    result: MaskProposalResult | None = None
    error: ErrorDetail | None = None
