"""The job function RQ runs: load the job's inputs from storage, configure the call, run
the pipeline, store the outputs, record the result.

`RUNTIME` is the worker process's loaded pipeline, settings, storage and Redis,
set once by the worker at start (the one piece of process-global state).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis import Redis
from rq import get_current_job

from service import metrics
from service.keys import CANCEL_KEY
from service.schemas import ErrorCode, JobState
from service.settings import Settings
from service.storage import (
    Storage,
    StorageError,
    input_key,
    output_key,
    output_prefix,
    request_key,
)
from service.validation import Params

log = logging.getLogger("magicface.worker")


@dataclass
class Runtime:
    pipe: Any
    settings: Settings
    storage: Storage
    redis: Redis


RUNTIME: Runtime | None = None


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancel flag is set."""


class JobFailed(Exception):
    """A failure whose code and message are already in job.meta['error']."""


def _fail(job, code: ErrorCode, message: str) -> JobFailed:
    job.meta["state"] = JobState.FAILED.value
    job.meta["error"] = {"code": code.value, "message": message}
    job.save_meta()
    metrics.count(job.connection, "jobs_failed")
    return JobFailed(f"{code.value}: {message}")


def _canceled(job, rt: Runtime) -> dict:
    job.meta["state"] = JobState.CANCELED.value
    job.save_meta()
    metrics.count(rt.redis, "jobs_canceled")
    return {"state": JobState.CANCELED.value}


def generate(job_id: str) -> dict:
    rt = RUNTIME
    if rt is None:
        raise RuntimeError("the worker runtime is not initialised")
    job = get_current_job()
    started = time.monotonic()
    job.meta["state"] = JobState.RUNNING.value
    job.save_meta()
    if rt.redis.exists(CANCEL_KEY.format(job_id)):
        return _canceled(job, rt)
    req, images, masks = load(rt, job, job_id)
    prompt, concepts, config = configure(rt, job, req, images, masks)
    try:
        res = run(rt, job, job_id, prompt, concepts, config)
    except JobCanceled:
        return _canceled(job, rt)
    result = store(rt, job, job_id, res)
    return record(rt, job, res, result, time.monotonic() - started)


def load(rt: Runtime, job, job_id: str) -> tuple[dict, list[bytes], list[bytes | None]]:
    """The request record and its images and masks, from storage."""
    try:
        req = json.loads(rt.storage.get(request_key(job_id)))
        n = len(req["concepts"])
        images = [rt.storage.get(input_key(job_id, "image", i)) for i in range(n)]
        masks = ([rt.storage.get(input_key(job_id, "mask", i)) for i in range(n)]
                 if req.get("masks") else [None] * n)
    except (StorageError, KeyError, ValueError) as e:
        raise _fail(job, ErrorCode.STORAGE_ERROR,
                    f"could not read the job's inputs: {e}") from None
    return req, images, masks


def configure(rt: Runtime, job, req: dict, images, masks):
    """The library's prompt, concepts and config for the request (records written
    before a parameter existed validate to its default)."""
    from magicface_core import Concept, MagicFaceInputError

    try:
        config = Params.model_validate(req["params"]).to_config(
            reference_seed=rt.settings.reference_seed, sam_checkpoint=rt.settings.sam_checkpoint)
        concepts = [Concept(image=img, mask=m, word=c["word"], weight=c.get("weight", 3.0),
                            reference_prompt=c.get("reference_prompt"))
                    for c, img, m in zip(req["concepts"], images, masks, strict=True)]
    except (MagicFaceInputError, ValidationError) as e:
        raise _fail(job, ErrorCode.INVALID_INPUT, str(e)) from None
    return req["prompt"], concepts, config


def run(rt: Runtime, job, job_id: str, prompt: str, concepts, config):
    """The pipeline, reporting progress per step and stopping at the cancel flag. Only
    the library's input errors are the client's (`invalid_input`); any other exception
    is the worker's and propagates (RQ records it: `internal_error`)."""
    import torch

    from magicface_core import MagicFaceInputError

    cancel_key = CANCEL_KEY.format(job_id)

    def on_step(step: int, total: int) -> None:
        job.meta["progress"] = {"step": step, "total": total}
        job.save_meta()
        if rt.redis.exists(cancel_key):
            raise JobCanceled()

    try:
        return rt.pipe.generate(prompt, concepts, config, on_step=on_step)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        raise _fail(job, ErrorCode.OUT_OF_MEMORY,
                    f"the GPU ran out of memory: {str(e)[:200]}") from None
    except MagicFaceInputError as e:
        raise _fail(job, ErrorCode.INVALID_INPUT, str(e)) from None


def store(rt: Runtime, job, job_id: str, res) -> dict:
    """The image (and the final semantic map over it) into storage; on a failure the
    outputs already written are removed, so a failed job leaves none."""
    from magicface_core.cli import overlay_semantic_map

    result = {"image": output_key(job_id, "image")}
    try:
        rt.storage.put(result["image"], _png(res.image), "image/png")
        if res.semantic_maps:
            result["semantic_map"] = output_key(job_id, "semantic_map")
            overlay = overlay_semantic_map(res.image, res.semantic_maps[-1])
            rt.storage.put(result["semantic_map"], _png(overlay), "image/png")
    except StorageError as e:
        try:  # best effort: storage may be the thing that is down
            rt.storage.delete_prefix(output_prefix(job_id))
        except StorageError:
            log.warning("job %s: could not remove partial outputs", job_id)
        raise _fail(job, ErrorCode.STORAGE_ERROR, f"could not store the result: {e}") \
            from None
    return result


def record(rt: Runtime, job, res, result: dict, elapsed: float) -> dict:
    """The job's success in its record and the metrics."""
    job.meta.update({"state": JobState.SUCCEEDED.value, "result": result,
                     "cache": {"hits": res.cache_hits, "misses": res.cache_misses},
                     "duration_s": elapsed})
    job.save_meta()
    metrics.count(rt.redis, "jobs_succeeded")
    metrics.count(rt.redis, "kv_cache_hits", res.cache_hits)
    metrics.count(rt.redis, "kv_cache_misses", res.cache_misses)
    metrics.observe_duration(rt.redis, elapsed)
    return {"state": JobState.SUCCEEDED.value, **result}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
