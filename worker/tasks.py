"""The job function RQ runs, top to bottom: `begin` (cancel flag and deadlines, then
`running`, the inputs loaded and configured), the pipeline sampled, `finish` (safety
check, outputs stored, the success recorded). `generate_batch` walks several jobs of
one batch key through the same steps with one sampling run.

`RUNTIME` is the worker process's loaded pipeline, settings, storage and Redis,
set once by the worker at start (the one piece of process-global state).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from rq import get_current_job
from rq.job import Job

from service import fairness, jobs, keys, records
from service.queueing import open_queue
from service.records import JobRecord
from service.schemas import ErrorCode, EventType, JobState
from service.validation import Params

from . import ending
from .job_files import drop_inputs, load, store
from .progress import publish, reporter
from .retry import REDIS_DOWN, retry
from .runtime import JobCanceled, JobFailed, Runtime

__all__ = ["RUNTIME", "Runtime", "JobCanceled", "JobFailed", "Begun", "Outcome", "generate",
           "generate_batch", "begin", "finish"]

log = logging.getLogger("magicface.worker")

RUNTIME: Runtime | None = None


@dataclass
class Begun:
    """A job that is running: its inputs loaded and configured."""

    rec: JobRecord
    prompt: str
    concepts: list
    config: Any
    started: float  # monotonic time the job began
    timings: dict


@dataclass
class Outcome:
    """What a job's function returns, or raises, computed ahead of RQ's call (a
    batch): the worker hands it back when RQ performs the job."""

    value: Any = None
    error: BaseException | None = None

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def generate(job_id: str) -> dict:
    """One job, alone (RQ's call)."""
    rt = RUNTIME
    if rt is None:
        raise RuntimeError("the worker runtime is not initialised")
    job = get_current_job()
    try:
        begun = begin(rt, job)
        if not isinstance(begun, Begun):
            return begun
        ending.count_sampling(rt, 1)
        t = time.monotonic()
        on_step = reporter(rt, job, begun.rec, begun.config, len(begun.concepts))
        try:
            res = rt.pipe.generate(begun.prompt, begun.concepts, begun.config,
                                   on_step=on_step)
        except Exception as e:  # noqa: BLE001 - sorted (and raised) by sampling_error
            return ending.sampling_error(rt, job, begun.rec, e)
        begun.timings["sample"] = round(time.monotonic() - t, 3)
        return finish(rt, job, res, begun)
    finally:
        if not rt.settings.keep_inputs:
            drop_inputs(rt, job_id)


def generate_batch(rt: Runtime, batch: list[Job]) -> dict[str, Outcome]:
    """Jobs of one batch key: each begun, then sampled together (`pipe.generate_batch`:
    one UNet batch per step), then finished one by one. Every job gets its own
    outcome: a bad input, a cancel or a storage failure is that job's alone."""
    outcomes: dict[str, Outcome] = {}
    ready: list[tuple[Job, Begun]] = []
    for job in batch:
        try:
            begun = begin(rt, job)
        except Exception as e:  # noqa: BLE001 - that job's failure
            outcomes[job.id] = Outcome(error=e)
            continue
        if isinstance(begun, Begun):
            ready.append((job, begun))
        else:
            outcomes[job.id] = Outcome(begun)
    if ready:
        outcomes.update(_sample_together(rt, ready))
    if not rt.settings.keep_inputs:
        for job in batch:
            drop_inputs(rt, job.id)
    return outcomes


def _sample_together(rt: Runtime, ready: list[tuple[Job, Begun]]) -> dict[str, Outcome]:
    from magicface_core.pipeline import GenerationRequest

    requests = [GenerationRequest(b.prompt, b.concepts, b.config,
                                  on_step=reporter(rt, job, b.rec, b.config, len(b.concepts)))
                for job, b in ready]
    ending.count_sampling(rt, len(requests))
    t = time.monotonic()
    try:
        results = rt.pipe.generate_batch(requests, max_batch=len(requests))
    except Exception as e:  # noqa: BLE001 - the batch failed: so did each job
        results = [e] * len(ready)
    sample_s = round(time.monotonic() - t, 3)
    log.info("batch of %d sampled in %.2f s", len(ready), sample_s)
    outcomes: dict[str, Outcome] = {}
    for (job, begun), res in zip(ready, results, strict=True):
        try:
            if isinstance(res, BaseException):
                outcomes[job.id] = Outcome(ending.sampling_error(rt, job, begun.rec, res))
                continue
            begun.timings.update(sample=sample_s, batch=len(ready))
            outcomes[job.id] = Outcome(finish(rt, job, res, begun))
        except Exception as e:  # noqa: BLE001 - that job's failure
            outcomes[job.id] = Outcome(error=e)
    return outcomes


def begin(rt: Runtime, job: Job) -> Begun | dict:
    """The job's start: its cancel flag and deadlines (a dict: it ended before it ran),
    then `running`, the started event, and its inputs loaded and configured."""
    started = time.monotonic()
    rec = records.read(job)  # UnreadableRecord: RQ fails the job, shown unreadable_job
    try:
        fairness.forget(rt.redis, job.origin, job.id)  # out of the queue for good
    except REDIS_DOWN as e:  # the sweeper drops it with the job
        log.warning("job %s: queue owner entry kept: %s", job.id, e)
    flag = retry(lambda: rt.redis.get(keys.CANCEL_KEY.format(job.id)), errors=REDIS_DOWN,
                 within_s=rt.settings.redis_retry_s, what=f"job {job.id}: cancel flag")
    due = rec.due()
    if flag is None and due is not None and time.time() >= due:
        flag = JobState.EXPIRED.value
    if (state := ending.flag_state(flag)) is not None:
        return ending.canceled(rt, job, rec, state)
    rec.state = JobState.RUNNING
    rec.progress.stage = "loading"
    rec.reproducibility = {"model": getattr(rt.pipe, "model_name", None),
                           "weights_sha256": rt.weights_sha256,
                           "library_version": _library_version(), "timings_s": {}}
    ending.save(rt, job, rec, "start")
    publish(rt, job, EventType.STARTED, _view(job))
    t = time.monotonic()
    req, images, masks = load(rt, job, rec)
    prompt, concepts, config = configure(rt, job, rec, req, images, masks)
    timings = rec.reproducibility["timings_s"]
    timings["load"] = round(time.monotonic() - t, 3)
    return Begun(rec, prompt, concepts, config, started, timings)


def configure(rt: Runtime, job: Job, rec: JobRecord, req: dict, images, masks):
    """The library's prompt, concepts and config for the request (records written
    before a parameter existed validate to its default)."""
    from magicface_core import Concept, MagicFaceInputError
    from magicface_core.rules import DEFAULT_WEIGHT

    try:
        config = Params.model_validate(req["params"]).to_config(
            reference_seed=rt.settings.reference_seed, sam_checkpoint=rt.settings.sam_checkpoint)
        masks = _propose_missing(rt, rec, req["concepts"], images, masks)
        concepts = [Concept(image=img, mask=m, word=c["word"],
                            weight=c.get("weight", DEFAULT_WEIGHT),
                            reference_prompt=c.get("reference_prompt"))
                    for c, img, m in zip(req["concepts"], images, masks, strict=True)]
    except (MagicFaceInputError, ValidationError) as e:
        raise ending.fail(rt, job, rec, ErrorCode.INVALID_INPUT, str(e)) from None
    return req["prompt"], concepts, config


def _propose_missing(rt: Runtime, rec: JobRecord, specs: list[dict], images: list,
                     masks: list) -> list:
    """A job sent without masks gets the proposer's, one per reference from its word
    (their sources go into the record); without a proposer the library's own SAM
    fallback (SAM_CHECKPOINT) or its error applies. Raises MagicFaceInputError naming
    the reference when nothing is found."""
    if rt.proposer is None or all(m is not None for m in masks):
        return masks
    out, sources = [], []
    for i, (spec, img, m) in enumerate(zip(specs, images, masks, strict=True)):
        if m is not None:
            out.append(m)
            sources.append("uploaded")
            continue
        p = rt.proposer(img, spec["word"], reference_prompt=spec.get("reference_prompt"),
                        index=i)
        out.append(p.mask)
        sources.append(p.source)
    rec.reproducibility["mask_sources"] = sources
    return out


def finish(rt: Runtime, job: Job, res, begun: Begun) -> dict:
    """A sampled job's end: the safety check, its outputs stored, its record."""
    rec = begun.rec
    _check_safety(rt, job, rec, res)
    t = time.monotonic()
    rec.progress.stage = "saving"
    result = store(rt, job, rec, res)
    begun.timings["store"] = round(time.monotonic() - t, 3)
    return ending.succeeded(rt, job, rec, res, result, time.monotonic() - begun.started)


def _check_safety(rt: Runtime, job: Job, rec: JobRecord, res) -> None:
    """SAFETY_CHECKER: `warn` marks a flagged image in the job's record and logs it;
    `block` fails the job (`unsafe_content`) and nothing is stored."""
    mode = rt.settings.safety_checker
    if rt.safety is None or mode == "off" or not rt.safety.flags(res.image):
        return
    log.warning("job %s: the safety checker flagged the image (%s)", job.id, mode)
    if mode == "block":
        raise ending.fail(rt, job, rec, ErrorCode.UNSAFE_CONTENT,
                          "the safety checker withheld the image")
    rec.flagged = True


def _view(job: Job) -> dict:
    return jobs.describe(job, open_queue(job.origin, job.connection),
                         refresh=False).model_dump(mode="json")


def _library_version() -> str:
    import magicface_core

    return magicface_core.__version__
