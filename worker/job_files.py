"""A job's objects in storage: its request and uploads read, its outputs written (all
or none), its uploads dropped once it ended. Storage outages are retried with backoff
for STORAGE_RETRY_S; a missing object is not retried."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import TypeVar

from rq.job import Job

from service.records import JobRecord
from service.schemas import ErrorCode
from service.storage import (
    StorageError,
    StorageNotFound,
    input_key,
    input_prefix,
    output_key,
    output_prefix,
    request_key,
)

from .ending import fail
from .retry import retry
from .runtime import Runtime

__all__ = ["load", "store", "drop_inputs", "through_outage"]

log = logging.getLogger("magicface.worker")
T = TypeVar("T")


class _Transient(Exception):
    """A storage error worth another try."""


def through_outage(rt: Runtime, what: str, fn: Callable[[], T]) -> T:
    """`fn()`, retried while storage is down (its last error raised after that)."""
    def attempt():
        try:
            return fn()
        except StorageNotFound:
            raise
        except StorageError as e:
            raise _Transient(e) from e

    try:
        return retry(attempt, errors=(_Transient,), within_s=rt.settings.storage_retry_s,
                     what=what)
    except _Transient as e:
        raise e.__cause__ from None


def load(rt: Runtime, job: Job, rec: JobRecord
         ) -> tuple[dict, list[bytes], list[bytes | None]]:
    """The request record and its images and masks (None each without masks)."""
    def get(key: str) -> bytes:
        return through_outage(rt, f"job {job.id}: read {key}", lambda: rt.storage.get(key))

    try:
        req = json.loads(get(request_key(job.id)))
        n = len(req["concepts"])
        images = [get(input_key(job.id, "image", i)) for i in range(n)]
        masks = ([get(input_key(job.id, "mask", i)) for i in range(n)]
                 if req.get("masks") else [None] * n)
    except (StorageError, KeyError, ValueError) as e:
        log.warning("job %s: inputs unreadable: %s", job.id, e)
        raise fail(rt, job, rec, ErrorCode.STORAGE_ERROR,
                   "could not read the job's inputs from storage") from None
    return req, images, masks


def store(rt: Runtime, job: Job, rec: JobRecord, res) -> dict[str, str]:
    """The image (and the final semantic map over it) into storage; output name ->
    key. On a failure the outputs already written are removed: a failed job has none."""
    from magicface_core.overlay import overlay_semantic_map

    def put(key: str, data: bytes) -> None:
        through_outage(rt, f"job {job.id}: write {key}",
                       lambda: rt.storage.put(key, data, "image/png"))

    result = {"image": output_key(job.id, "image")}
    try:
        put(result["image"], _png(res.image))
        if res.semantic_maps:
            result["semantic_map"] = output_key(job.id, "semantic_map")
            put(result["semantic_map"],
                _png(overlay_semantic_map(res.image, res.semantic_maps[-1])))
    except StorageError as e:
        log.warning("job %s: result not stored: %s", job.id, e)
        try:  # best effort: storage may be the thing that is down
            rt.storage.delete_prefix(output_prefix(job.id))
        except StorageError:
            log.warning("job %s: could not remove partial outputs", job.id)
        raise fail(rt, job, rec, ErrorCode.STORAGE_ERROR,
                   "could not store the result in storage") from None
    return result


def drop_inputs(rt: Runtime, job_id: str) -> None:
    """A job's uploads (images, masks, the request record) once it has ended, however
    it ended (KEEP_INPUTS=false). Best effort: the sweeper takes what is left."""
    try:
        through_outage(rt, f"job {job_id}: delete inputs",
                       lambda: rt.storage.delete_prefix(input_prefix(job_id)))
        through_outage(rt, f"job {job_id}: delete request",
                       lambda: rt.storage.delete(request_key(job_id)))
    except StorageError as e:
        log.warning("job %s: inputs not deleted: %s", job_id, e)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
