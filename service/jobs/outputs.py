"""A finished job's outputs: where to read them (a presigned URL, else a stream from
storage), refused with the job's own reason while it has none."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ApiError
from ..schemas import JobState, JobView
from ..storage import Storage, StorageError, output_key

__all__ = ["Output", "output"]

log = logging.getLogger("magicface.gateway")


@dataclass(frozen=True)
class Output:
    url: str | None = None  # presigned: the client fetches it from storage
    body: Iterator[bytes] | None = None  # else the gateway streams it


def output(view: JobView, name: str, storage: Storage, expires_s: int, rid: str) -> Output:
    """The job's output `name` ("image", "semantic_map"). `view` is the owner's: a
    presigned URL goes only to the job's owner."""
    job_id = view.id
    if view.status in (JobState.FAILED, JobState.CANCELED, JobState.EXPIRED):
        err = view.error
        raise ApiError(410, err.code if err else view.status.value,
                       f"job {job_id} is {view.status.value}"
                       + (f": {err.message}" if err else ""))
    if view.status != JobState.SUCCEEDED:
        raise ApiError(409, "not_ready",
                       f"job {job_id} is {view.status.value}, not succeeded")
    key = output_key(job_id, name)
    url = storage.presign(key, expires_s)
    if url:
        return Output(url=url)
    try:
        if not storage.exists(key):
            raise ApiError(404, "not_found", f"job {job_id} has no {name.replace('_', ' ')}")
        return Output(body=storage.stream(key))
    except StorageError as e:
        log.warning("request %s: download of %s failed: %s", rid, key, e)
        raise ApiError(503, "storage_unavailable",
                       f"storage is unavailable (request {rid})") from None
