"""The job function RQ runs: read inputs from storage, generate, upload results.

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

from service import jobs, metrics
from service.settings import Settings
from service.storage import (
    Storage,
    StorageError,
    input_key,
    output_key,
    output_prefix,
    request_key,
)
from service.validation import Params, generation_config

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


def _fail(job, code: str, message: str) -> JobFailed:
    job.meta["state"] = "failed"
    job.meta["error"] = {"code": code, "message": message}
    job.save_meta()
    metrics.count(job.connection, "jobs_failed")
    return JobFailed(f"{code}: {message}")


def generate(job_id: str) -> dict:
    import torch

    from magicface_core import Concept
    from magicface_core.cli import overlay_semantic_map

    rt = RUNTIME
    if rt is None:
        raise RuntimeError("the worker runtime is not initialised")
    job = get_current_job()
    started = time.monotonic()
    cancel_key = jobs.CANCEL_KEY.format(job_id)
    job.meta["state"] = "running"
    job.save_meta()

    def canceled() -> dict:
        job.meta["state"] = "canceled"
        job.save_meta()
        metrics.count(rt.redis, "jobs_canceled")
        return {"state": "canceled"}

    if rt.redis.exists(cancel_key):
        return canceled()
    try:
        req = json.loads(rt.storage.get(request_key(job_id)))
        n = len(req["concepts"])
        images = [rt.storage.get(input_key(job_id, "image", i)) for i in range(n)]
        masks = ([rt.storage.get(input_key(job_id, "mask", i)) for i in range(n)]
                 if req.get("masks") else [None] * n)
    except (StorageError, KeyError, ValueError) as e:
        raise _fail(job, "storage_error", f"could not read the job's inputs: {e}") from None

    try:
        # Records written before a field existed validate to its default.
        config = generation_config(
            Params.model_validate(req["params"]), reference_seed=rt.settings.reference_seed,
            sam_checkpoint=rt.settings.sam_checkpoint)
        concepts = [Concept(image=img, mask=m, word=c["word"], weight=c.get("weight", 3.0),
                            reference_prompt=c.get("reference_prompt"))
                    for c, img, m in zip(req["concepts"], images, masks, strict=True)]
    except (ValueError, KeyError, ValidationError) as e:
        raise _fail(job, "invalid_input", str(e)) from None

    def on_step(step: int, total: int) -> None:
        job.meta["progress"] = {"step": step, "total": total}
        job.save_meta()
        if rt.redis.exists(cancel_key):
            raise JobCanceled()

    try:
        res = rt.pipe.generate(req["prompt"], concepts, config, on_step=on_step)
    except JobCanceled:
        return canceled()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        raise _fail(job, "out_of_memory", f"the GPU ran out of memory: {str(e)[:200]}") \
            from None
    except ValueError as e:
        raise _fail(job, "invalid_input", str(e)) from None

    result = {"image": output_key(job_id, "image")}
    try:
        rt.storage.put(result["image"], _png(res.image), "image/png")
        if res.semantic_maps:
            result["semantic_map"] = output_key(job_id, "semantic_map")
            overlay = overlay_semantic_map(res.image, res.semantic_maps[-1])
            rt.storage.put(result["semantic_map"], _png(overlay), "image/png")
    except StorageError as e:
        # A failed job leaves no outputs behind (the image may have gone up before
        # the map failed). Best effort: storage may be the thing that is down.
        try:
            rt.storage.delete_prefix(output_prefix(job_id))
        except StorageError:
            log.warning("job %s: could not remove partial outputs", job_id)
        raise _fail(job, "storage_error", f"could not store the result: {e}") from None

    elapsed = time.monotonic() - started
    job.meta.update({"state": "succeeded", "result": result,
                     "cache": {"hits": res.cache_hits, "misses": res.cache_misses},
                     "duration_s": elapsed})
    job.save_meta()
    metrics.count(rt.redis, "jobs_succeeded")
    metrics.count(rt.redis, "kv_cache_hits", res.cache_hits)
    metrics.count(rt.redis, "kv_cache_misses", res.cache_misses)
    metrics.observe_duration(rt.redis, elapsed)
    return {"state": "succeeded", **result}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
