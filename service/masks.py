"""Mask proposals (`POST /v1/masks`): an image and a concept word in, a mask out, made
by a worker that has the detector (and SAM) loaded; the gateway never loads a model.

A proposal is a short RQ job on a queue of its own (`Settings.mask_queue_name`): its
input (the image, base64, and the word) is the job's JSON argument and its answer the
job's JSON return value, both gone with the job after MASK_TTL_S, so a proposal leaves
nothing in storage. The worker answers `{"ok": false, "error": ...}` when nothing was
found: the client's problem, not a failure of the job."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus

from magicface_core.limits import TEXT_LIMITS
from magicface_core.rules import normalize_word

from . import records
from .errors import ApiError
from .jobs.errors import JobNotFound
from .jobs.queries import JOB_ID
from .queueing import fetch_job
from .records import MaskRecord, UnreadableRecord
from .schemas import ErrorDetail, MaskProposalResult, MaskStatus, MaskView
from .settings import Settings
from .validation import Upload, decode_image
from .workers import live_workers

__all__ = ["MASK_TASK", "MaskRequest", "mask_request", "check_room", "submit", "fetch",
           "view"]

# The worker's function for a proposal (matched by name, never imported by RQ).
MASK_TASK = "worker.masks.propose"


@dataclass(frozen=True)
class MaskRequest:
    image: bytes  # decoded and checked (format, bytes, pixels)
    word: str
    reference_prompt: str | None = None


def mask_request(image: Upload | None, word: object, reference_prompt: object,
                 settings: Settings) -> MaskRequest:
    """The request's fields checked, each error naming its field (422, 413)."""
    if image is None:
        raise ApiError(422, "invalid_request", "image: field required")
    if not isinstance(word, str) or not normalize_word(word):
        raise ApiError(422, "invalid_request", "word: a non-empty string is required")
    if len(word) > TEXT_LIMITS["word"]:
        raise ApiError(422, "invalid_request",
                       f"word: at most {TEXT_LIMITS['word']} characters")
    if reference_prompt is not None and (
            not isinstance(reference_prompt, str)
            or len(reference_prompt) > TEXT_LIMITS["reference_prompt"]):
        raise ApiError(422, "invalid_request",
                       "reference_prompt: a string of at most "
                       f"{TEXT_LIMITS['reference_prompt']} characters")
    decode_image(image, "image", settings)
    return MaskRequest(image.data, word.strip(), reference_prompt or None)


def check_room(redis: Redis, queue: Queue, settings: Settings) -> None:
    """503 when no live worker proposes masks (nothing would ever answer); 429 when
    MAX_QUEUED_MASKS proposals wait."""
    if not any(w.get("masks") for w in live_workers(redis, settings.queue_name)):
        raise ApiError(503, "no_mask_worker",
                       "no worker proposes masks: start one with MASK_DETECTOR (a "
                       "Grounding DINO model) or MASK_FACES=true, or send masks")
    if queue.count >= settings.max_queued_masks:
        raise ApiError(429, "queue_full", f"{queue.count} mask proposals are waiting (at "
                                          f"most {settings.max_queued_masks}); retry "
                                          "later", headers={"Retry-After": "5"})


def submit(queue: Queue, req: MaskRequest, owner: str, settings: Settings) -> Job:
    job_id = uuid.uuid4().hex
    arg = {"image": base64.b64encode(req.image).decode(), "word": req.word,
           "reference_prompt": req.reference_prompt}
    return queue.enqueue(MASK_TASK, arg, job_id=job_id, ttl=settings.mask_ttl_s,
                         result_ttl=settings.mask_ttl_s, failure_ttl=settings.mask_ttl_s,
                         job_timeout=120,
                         meta=MaskRecord(owner=owner, word=req.word).dump())


def fetch(redis: Redis, mask_id: str, owner: str) -> Job:
    """The proposal, if it exists and is the owner's (another's is as unknown)."""
    missing = JobNotFound(f"mask {mask_id[:64]!r} does not exist")
    if not JOB_ID.fullmatch(mask_id or ""):
        raise missing
    try:
        job = fetch_job(mask_id, redis)
        rec = records.read_mask(job)
        task = job.func_name  # DeserializationError for a record that is not JSON
    except (NoSuchJobError, UnreadableRecord, DeserializationError):
        raise missing from None
    if task != MASK_TASK or rec.owner != owner:
        raise missing
    return job


def view(job: Job) -> MaskView:
    word = records.read_mask(job).word
    status = job.get_status(refresh=False)
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, None):
        return MaskView(id=job.id, status=MaskStatus.QUEUED, word=word)
    if status == JobStatus.STARTED:
        return MaskView(id=job.id, status=MaskStatus.RUNNING, word=word)
    answer = job.return_value() if status == JobStatus.FINISHED else None
    if isinstance(answer, dict) and answer.get("ok"):
        return MaskView(id=job.id, status=MaskStatus.SUCCEEDED, word=word,
                        result=MaskProposalResult(**answer["proposal"]))
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return MaskView(id=job.id, status=MaskStatus.FAILED, word=word,
                        error=ErrorDetail(**answer["error"]))
    return MaskView(id=job.id, status=MaskStatus.FAILED, word=word,
                    error=ErrorDetail(code="internal_error",
                                      message="the mask proposal failed unexpectedly"))


def wait(job: Job, seconds: float, poll_s: float = 0.05) -> MaskView:
    """The view once the proposal ends or `seconds` pass (a thread: it sleeps)."""
    deadline = time.monotonic() + seconds
    while True:
        job.refresh()
        v = view(job)
        if v.status in (MaskStatus.SUCCEEDED, MaskStatus.FAILED) or time.monotonic() > deadline:
            return v
        time.sleep(poll_s)
