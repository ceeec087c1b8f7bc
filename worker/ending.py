"""How a job's end goes into its record and the metrics: failed (with the code the
client sees), canceled or expired, or succeeded (with what it takes to make the image
again). A job's end must be recorded, so its record is written through a Redis
outage (up to REDIS_RETRY_S); a count is not worth a job, so counts are best effort."""

from __future__ import annotations

import dataclasses
import logging

from rq.job import Job

from service import metrics, records
from service.records import JobRecord
from service.schemas import ErrorCode, ErrorDetail, JobState

from .retry import REDIS_DOWN, retry
from .runtime import JobCanceled, JobFailed, Runtime

__all__ = ["save", "count", "count_sampling", "fail", "canceled", "succeeded",
           "sampling_error", "flag_state"]

log = logging.getLogger("magicface.worker")


def save(rt: Runtime, job: Job, rec: JobRecord, what: str) -> None:
    retry(lambda: records.write(job, rec), errors=REDIS_DOWN,
          within_s=rt.settings.redis_retry_s, what=f"job {job.id}: {what}")


def count(rt: Runtime, name: str, amount: float = 1) -> None:
    try:
        metrics.count(rt.redis, name, amount)
    except REDIS_DOWN as e:
        log.warning("metrics: %s not counted: %s", name, e)


def count_sampling(rt: Runtime, jobs_sampled: int) -> None:
    """One sampling run of `jobs_sampled` jobs (their ratio is the mean batch)."""
    count(rt, "sampling_batches")
    count(rt, "sampled_jobs", jobs_sampled)


def fail(rt: Runtime, job: Job, rec: JobRecord, code: ErrorCode, message: str) -> JobFailed:
    """Record the failure; the exception to raise (RQ then records the job failed)."""
    rec.state, rec.error = JobState.FAILED, ErrorDetail(code=code.value, message=message)
    save(rt, job, rec, "failure")
    count(rt, "jobs_failed")
    return JobFailed(f"{code.value}: {message}")


def canceled(rt: Runtime, job: Job, rec: JobRecord,
             state: JobState = JobState.CANCELED) -> dict:
    """Record a cancel or an expiry; what the job's function returns."""
    rec.state = state
    save(rt, job, rec, state.value)
    count(rt, f"jobs_{state.value}")
    return {"state": state.value}


def flag_state(raw) -> JobState | None:
    """The state a cancel flag asks for (flags set before it carried one: canceled)."""
    if raw is None:
        return None
    value = raw.decode() if isinstance(raw, bytes) else str(raw)
    return JobState.EXPIRED if value == JobState.EXPIRED.value else JobState.CANCELED


def sampling_error(rt: Runtime, job: Job, rec: JobRecord, e: BaseException) -> dict:
    """A sampling exception as the job's end: a cancel (returned), out of memory or a
    bad input (failed, raised as JobFailed), anything else re-raised as it is (RQ
    records it: `internal_error`)."""
    import torch

    from magicface_core import MagicFaceInputError

    if isinstance(e, JobCanceled):
        return canceled(rt, job, rec, e.state)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        log.warning("job %s: %s", job.id, e)
        raise fail(rt, job, rec, ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory") from None
    if isinstance(e, MagicFaceInputError):
        raise fail(rt, job, rec, ErrorCode.INVALID_INPUT, str(e)) from None
    raise e


def succeeded(rt: Runtime, job: Job, rec: JobRecord, res, result: dict[str, str],
              elapsed: float) -> dict:
    """Record the success with what it takes to make the image again, and count it."""
    repro = rec.reproducibility
    if res.config is not None:
        params = {k: v for k, v in dataclasses.asdict(res.config).items()
                  if k not in ("sam_checkpoint",)}
        ref_seed = res.config.reference_seed
        repro.update({"seed": res.config.seed,
                      "reference_seed": res.config.seed if ref_seed is None else ref_seed,
                      "preset": res.config.preset, "params": params})
    repro["duration_s"] = round(elapsed, 3)
    rec.state, rec.result, rec.duration_s = JobState.SUCCEEDED, result, elapsed
    rec.cache = {"hits": res.cache_hits, "misses": res.cache_misses}
    save(rt, job, rec, "success")
    count(rt, "jobs_succeeded")
    count(rt, "kv_cache_hits", res.cache_hits)
    count(rt, "kv_cache_misses", res.cache_misses)
    try:
        metrics.observe_duration(rt.redis, elapsed)
    except REDIS_DOWN as e:
        log.warning("metrics: duration not observed: %s", e)
    return {"state": JobState.SUCCEEDED.value, **result}
