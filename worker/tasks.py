"""The job function RQ runs: load the job's inputs from storage, configure the call, run
the pipeline, store the outputs, record the result.

`RUNTIME` is the worker process's loaded pipeline, settings, storage and Redis,
set once by the worker at start (the one piece of process-global state).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis import Redis
from rq import get_current_job

from service import events, fairness, jobs, keys, metrics
from service.queueing import open_queue
from service.schemas import ErrorCode, EventType, JobState
from service.settings import Settings
from service.storage import (
    Storage,
    StorageError,
    StorageNotFound,
    input_key,
    output_key,
    output_prefix,
    request_key,
)
from service.validation import Params

from .retry import REDIS_DOWN, retry

log = logging.getLogger("magicface.worker")


@dataclass
class Runtime:
    pipe: Any
    settings: Settings
    storage: Storage
    redis: Redis
    safety: Any = None  # a SafetyChecker when SAFETY_CHECKER is warn or block
    weights_sha256: str | None = None  # of the loaded model, for the job's record


RUNTIME: Runtime | None = None


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancel flag is set; `state` is the
    flag's value: canceled (a client) or expired (a deadline)."""

    def __init__(self, state: JobState = JobState.CANCELED):
        super().__init__(state.value)
        self.state = state


class JobFailed(Exception):
    """A failure whose code and message are already in job.meta['error']."""


def _save(rt: Runtime, job, what: str) -> None:
    """Write the job's meta, waiting out a Redis outage (up to REDIS_RETRY_S): a job's
    end must be recorded."""
    retry(job.save_meta, errors=REDIS_DOWN, within_s=rt.settings.redis_retry_s,
          what=f"job {job.id}: {what}")


def _count(rt: Runtime, name: str, amount: float = 1) -> None:
    try:
        metrics.count(rt.redis, name, amount)
    except REDIS_DOWN as e:  # a lost count is not worth a job
        log.warning("metrics: %s not counted: %s", name, e)


def _count_sampling(rt: Runtime, jobs_sampled: int) -> None:
    """One sampling run of `jobs_sampled` jobs (their ratio is the mean batch)."""
    _count(rt, "sampling_batches")
    _count(rt, "sampled_jobs", jobs_sampled)


def _fail(rt: Runtime, job, code: ErrorCode, message: str) -> JobFailed:
    job.meta["state"] = JobState.FAILED.value
    job.meta["error"] = {"code": code.value, "message": message}
    _save(rt, job, "failure")
    _count(rt, "jobs_failed")
    return JobFailed(f"{code.value}: {message}")


def _canceled(job, rt: Runtime, state: JobState = JobState.CANCELED) -> dict:
    job.meta["state"] = state.value
    _save(rt, job, state.value)
    _count(rt, f"jobs_{state.value}")
    return {"state": state.value}


def _flag_state(raw) -> JobState | None:
    """The state a cancel flag asks for (flags set before it carried one: canceled)."""
    if raw is None:
        return None
    value = raw.decode() if isinstance(raw, bytes) else str(raw)
    return JobState.EXPIRED if value == JobState.EXPIRED.value else JobState.CANCELED


def publish(rt: Runtime, job, event: EventType, data: dict) -> None:
    """Append a job event (best effort for progress; a lost progress event is not worth
    a job)."""
    try:
        events.publish(rt.redis, job.id, event, data, rt.settings.result_ttl_s + 3600)
    except REDIS_DOWN as e:
        log.warning("job %s: %s event not published: %s", job.id, event.value, e)


def _view(rt: Runtime, job) -> dict:
    return jobs.describe(job, open_queue(job.origin, rt.redis),
                    refresh=False).model_dump(mode="json")


def _storage(rt: Runtime, what: str, fn):
    """A storage operation, retried with backoff for STORAGE_RETRY_S (an outage or a
    restart of the storage service); a missing object is not retried."""
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


class _Transient(Exception):
    """A storage error worth another try."""


@dataclass
class Begun:
    """A job that is running: its inputs loaded and configured."""

    prompt: str
    concepts: list
    config: Any
    started: float  # monotonic time the job began
    timings: dict


@dataclass
class Outcome:
    """What a job's function returns, or raises, computed ahead of RQ's call (a
    batch): `generate` hands it back when RQ performs the job."""

    value: Any = None
    error: BaseException | None = None

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def generate(job_id: str) -> dict:
    rt = RUNTIME
    if rt is None:
        raise RuntimeError("the worker runtime is not initialised")
    job = get_current_job()
    try:
        begun = begin(rt, job, job_id)
        if not isinstance(begun, Begun):
            return begun
        _count_sampling(rt, 1)
        t = time.monotonic()
        try:
            res = run(rt, job, job_id, begun.prompt, begun.concepts, begun.config)
        except JobCanceled as e:
            return _canceled(job, rt, e.state)
        begun.timings["sample"] = round(time.monotonic() - t, 3)
        return finish(rt, job, job_id, res, begun)
    finally:
        if not rt.settings.keep_inputs:
            drop_inputs(rt, job_id)


def generate_batch(rt: Runtime, batch: list) -> dict[str, Outcome]:
    """Jobs of one batch key: each begun (cancel flag, inputs), then sampled together
    (`pipe.generate_batch`: one UNet batch per step), then finished one by one. Every
    job gets its own outcome: a bad input, a cancel or a storage failure is that
    job's alone."""
    outcomes: dict[str, Outcome] = {}
    ready: list[tuple[Any, Begun]] = []
    for job in batch:
        try:
            begun = begin(rt, job, job.id)
        except Exception as e:  # noqa: BLE001 - that job's failure
            outcomes[job.id] = Outcome(error=e)
            continue
        if isinstance(begun, Begun):
            ready.append((job, begun))
        else:
            outcomes[job.id] = Outcome(begun)
    if ready:
        from magicface_core.pipeline import GenerationRequest

        requests = [GenerationRequest(b.prompt, b.concepts, b.config,
                                      on_step=_reporter(rt, job, job.id, b.config,
                                                        len(b.concepts)))
                    for job, b in ready]
        _count_sampling(rt, len(requests))
        t = time.monotonic()
        try:
            results = rt.pipe.generate_batch(requests, max_batch=len(requests))
        except Exception as e:  # noqa: BLE001 - the batch failed: so did each job
            results = [e] * len(ready)
        sample_s = round(time.monotonic() - t, 3)
        log.info("batch of %d sampled in %.2f s", len(ready), sample_s)
        for (job, begun), res in zip(ready, results, strict=True):
            try:
                if isinstance(res, BaseException):
                    outcomes[job.id] = Outcome(_sampling_error(rt, job, job.id, res))
                    continue
                begun.timings["sample"] = sample_s
                begun.timings["batch"] = len(ready)
                outcomes[job.id] = Outcome(finish(rt, job, job.id, res, begun))
            except Exception as e:  # noqa: BLE001 - that job's failure
                outcomes[job.id] = Outcome(error=e)
    if not rt.settings.keep_inputs:
        for job in batch:
            drop_inputs(rt, job.id)
    return outcomes


def begin(rt: Runtime, job, job_id: str) -> Begun | dict:
    """The job's start: its cancel flag and deadlines (a dict: it ended before it ran),
    then `running`, the started event, and its inputs loaded and configured."""
    started = time.monotonic()
    try:
        fairness.forget(rt.redis, job.origin, job_id)  # out of the queue for good
    except REDIS_DOWN as e:  # the sweeper drops it with the job
        log.warning("job %s: queue owner entry kept: %s", job_id, e)
    flag = retry(lambda: rt.redis.get(keys.CANCEL_KEY.format(job_id)), errors=REDIS_DOWN,
                 within_s=rt.settings.redis_retry_s, what=f"job {job_id}: cancel flag")
    due = [float(d) for d in (job.meta.get("deadline"), job.meta.get("queue_deadline"))
           if d is not None]
    if flag is None and due and time.time() >= min(due):
        flag = JobState.EXPIRED.value
    if (state := _flag_state(flag)) is not None:
        return _canceled(job, rt, state)
    job.meta["state"] = JobState.RUNNING.value
    job.meta["progress"] = {**job.meta.get("progress", {}), "stage": "loading"}
    job.meta["reproducibility"] = {"model": getattr(rt.pipe, "model_name", None),
                                   "weights_sha256": rt.weights_sha256,
                                   "library_version": _library_version()}
    _save(rt, job, "start")
    publish(rt, job, EventType.STARTED, _view(rt, job))
    timings = job.meta["reproducibility"].setdefault("timings_s", {})
    t = time.monotonic()
    req, images, masks = load(rt, job, job_id)
    prompt, concepts, config = configure(rt, job, req, images, masks)
    timings["load"] = round(time.monotonic() - t, 3)
    return Begun(prompt, concepts, config, started, timings)


def finish(rt: Runtime, job, job_id: str, res, begun: Begun) -> dict:
    """A sampled job's end: the safety check, its outputs stored, its record."""
    check_safety(rt, job, job_id, res)
    t = time.monotonic()
    job.meta["progress"]["stage"] = "saving"
    result = store(rt, job, job_id, res)
    begun.timings["store"] = round(time.monotonic() - t, 3)
    return record(rt, job, res, result, time.monotonic() - begun.started)


def drop_inputs(rt: Runtime, job_id: str) -> None:
    """A job's uploads (images, masks, the request record) once it has ended, however
    it ended (KEEP_INPUTS=false). Best effort: the sweeper takes what is left."""
    try:
        _storage(rt, f"job {job_id}: delete inputs",
                 lambda: rt.storage.delete_prefix(f"jobs/{job_id}/input/"))
        _storage(rt, f"job {job_id}: delete request",
                 lambda: rt.storage.delete(request_key(job_id)))
    except StorageError as e:
        log.warning("job %s: inputs not deleted: %s", job_id, e)


def load(rt: Runtime, job, job_id: str) -> tuple[dict, list[bytes], list[bytes | None]]:
    """The request record and its images and masks, from storage."""
    def get(key: str) -> bytes:
        return _storage(rt, f"job {job_id}: read {key}", lambda: rt.storage.get(key))

    try:
        req = json.loads(get(request_key(job_id)))
        n = len(req["concepts"])
        images = [get(input_key(job_id, "image", i)) for i in range(n)]
        masks = ([get(input_key(job_id, "mask", i)) for i in range(n)]
                 if req.get("masks") else [None] * n)
    except (StorageError, KeyError, ValueError) as e:
        log.warning("job %s: inputs unreadable: %s", job_id, e)
        raise _fail(rt, job, ErrorCode.STORAGE_ERROR,
                    "could not read the job's inputs from storage") from None
    return req, images, masks


def configure(rt: Runtime, job, req: dict, images, masks):
    """The library's prompt, concepts and config for the request (records written
    before a parameter existed validate to its default)."""
    from magicface_core import Concept, MagicFaceInputError
    from magicface_core.rules import DEFAULT_WEIGHT

    try:
        config = Params.model_validate(req["params"]).to_config(
            reference_seed=rt.settings.reference_seed, sam_checkpoint=rt.settings.sam_checkpoint)
        concepts = [Concept(image=img, mask=m, word=c["word"],
                            weight=c.get("weight", DEFAULT_WEIGHT),
                            reference_prompt=c.get("reference_prompt"))
                    for c, img, m in zip(req["concepts"], images, masks, strict=True)]
    except (MagicFaceInputError, ValidationError) as e:
        raise _fail(rt, job, ErrorCode.INVALID_INPUT, str(e)) from None
    return req["prompt"], concepts, config


def run(rt: Runtime, job, job_id: str, prompt: str, concepts, config):
    """The pipeline, reporting progress per step and stopping at the cancel flag. Only
    the library's input errors are the client's (`invalid_input`); any other exception
    is the worker's and propagates (RQ records it: `internal_error`)."""
    on_step = _reporter(rt, job, job_id, config, len(concepts))
    try:
        return rt.pipe.generate(prompt, concepts, config, on_step=on_step)
    except JobCanceled:
        raise
    except Exception as e:  # noqa: BLE001 - sorted (and raised) by _sampling_error
        _sampling_error(rt, job, job_id, e)
        raise


def _sampling_error(rt: Runtime, job, job_id: str, e: BaseException) -> dict:
    """A sampling exception as the job's end: a cancel (returned), out of memory or a
    bad input (failed, raised as JobFailed), anything else re-raised as it is."""
    import torch

    from magicface_core import MagicFaceInputError

    if isinstance(e, JobCanceled):
        return _canceled(job, rt, e.state)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        log.warning("job %s: %s", job_id, e)
        raise _fail(rt, job, ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory") from None
    if isinstance(e, MagicFaceInputError):
        raise _fail(rt, job, ErrorCode.INVALID_INPUT, str(e)) from None
    raise e


def _reporter(rt: Runtime, job, job_id: str, config, n_concepts: int):
    """The job's step callback: progress into its record and event stream, and the
    cancel flag checked (JobCanceled)."""
    cancel_key = keys.CANCEL_KEY.format(job_id)
    rsa_steps = config.resolve(n_concepts).rsa_steps
    clock = {"start": time.monotonic(), "published": 0.0}

    def on_step(step: int, total: int) -> None:
        # Progress and the cancel flag are best effort: a Redis outage mid-job must not
        # fail the job (its end is recorded once Redis is back).
        now = time.monotonic()
        per_step = (now - clock["start"]) / step
        progress = {"step": step, "total": total,
                    "percent": round(100.0 * step / total, 1),
                    "eta_s": round(per_step * (total - step), 2), "s_per_step": per_step,
                    # The step about to run: RSA for the first rsa_steps, then RBA.
                    "stage": "rsa" if step < rsa_steps else "rba"}
        job.meta["progress"] = progress
        try:
            job.save_meta()
            flag = rt.redis.get(cancel_key)
        except REDIS_DOWN as e:
            log.warning("job %s: step %d not reported: %s", job_id, step, e)
            return
        # Events at most every PROGRESS_INTERVAL_S (webhooks follow the stream), and
        # always the last step.
        if step == total or now - clock["published"] >= events.PROGRESS_INTERVAL_S:
            clock["published"] = now
            publish(rt, job, EventType.PROGRESS,
                    {k: progress[k] for k in ("step", "total", "percent", "eta_s", "stage")})
        if (state := _flag_state(flag)) is not None:
            raise JobCanceled(state)

    return on_step


def check_safety(rt: Runtime, job, job_id: str, res) -> None:
    """SAFETY_CHECKER: `warn` marks a flagged image in the job's record and logs it;
    `block` fails the job (`unsafe_content`) and nothing is stored."""
    mode = rt.settings.safety_checker
    if rt.safety is None or mode == "off" or not rt.safety.flags(res.image):
        return
    log.warning("job %s: the safety checker flagged the image (%s)", job_id, mode)
    if mode == "block":
        raise _fail(rt, job, ErrorCode.UNSAFE_CONTENT,
                    "the safety checker withheld the image")
    job.meta["flagged"] = True


def store(rt: Runtime, job, job_id: str, res) -> dict:
    """The image (and the final semantic map over it) into storage; on a failure the
    outputs already written are removed, so a failed job leaves none."""
    from magicface_core.overlay import overlay_semantic_map

    def put(key: str, data: bytes) -> None:
        _storage(rt, f"job {job_id}: write {key}", lambda: rt.storage.put(key, data,
                                                                         "image/png"))

    result = {"image": output_key(job_id, "image")}
    try:
        put(result["image"], _png(res.image))
        if res.semantic_maps:
            result["semantic_map"] = output_key(job_id, "semantic_map")
            put(result["semantic_map"],
                _png(overlay_semantic_map(res.image, res.semantic_maps[-1])))
    except StorageError as e:
        log.warning("job %s: result not stored: %s", job_id, e)
        try:  # best effort: storage may be the thing that is down
            rt.storage.delete_prefix(output_prefix(job_id))
        except StorageError:
            log.warning("job %s: could not remove partial outputs", job_id)
        raise _fail(rt, job, ErrorCode.STORAGE_ERROR,
                    "could not store the result in storage") from None
    return result


def record(rt: Runtime, job, res, result: dict, elapsed: float) -> dict:
    """The job's success in its record (with what it takes to make it again) and the
    metrics."""
    repro = job.meta.setdefault("reproducibility", {})
    if res.config is not None:
        params = {k: v for k, v in dataclasses.asdict(res.config).items()
                  if k not in ("sam_checkpoint",)}
        ref_seed = res.config.reference_seed
        repro.update({"seed": res.config.seed,
                      "reference_seed": res.config.seed if ref_seed is None else ref_seed,
                      "preset": res.config.preset, "params": params})
    repro["duration_s"] = round(elapsed, 3)
    job.meta.update({"state": JobState.SUCCEEDED.value, "result": result,
                     "cache": {"hits": res.cache_hits, "misses": res.cache_misses},
                     "duration_s": elapsed})
    _save(rt, job, "success")
    _count(rt, "jobs_succeeded")
    _count(rt, "kv_cache_hits", res.cache_hits)
    _count(rt, "kv_cache_misses", res.cache_misses)
    try:
        metrics.observe_duration(rt.redis, elapsed)
    except REDIS_DOWN as e:
        log.warning("metrics: duration not observed: %s", e)
    return {"state": JobState.SUCCEEDED.value, **result}


def _library_version() -> str:
    import magicface_core

    return magicface_core.__version__


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
