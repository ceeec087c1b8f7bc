"""A running job's step callback: its progress into its record and event stream, and
its cancel flag read at every step. Both are best effort: a Redis outage mid-job must
not fail the job (its end is recorded once Redis is back)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from rq.job import Job

from service import keys, records
from service.jobs import events
from service.records import JobRecord, StepProgress
from service.schemas import EventType

from .ending import flag_state
from .retry import REDIS_DOWN
from .runtime import JobCanceled, Runtime

__all__ = ["publish", "reporter"]

log = logging.getLogger("magicface.worker")


def publish(rt: Runtime, job: Job, event: EventType, data: dict) -> None:
    """Append a job event (a lost progress event is not worth a job)."""
    try:
        events.publish(rt.redis, job.id, event, data, rt.settings.result_ttl_s)
    except REDIS_DOWN as e:
        log.warning("job %s: %s event not published: %s", job.id, event.value, e)


def reporter(rt: Runtime, job: Job, rec: JobRecord, config,
             n_concepts: int) -> Callable[[int, int], None]:
    """The job's `on_step(step, total)`; raises JobCanceled at the cancel flag."""
    cancel_key = keys.CANCEL_KEY.format(job.id)
    rsa_steps = config.resolve(n_concepts).rsa_steps
    clock = {"start": time.monotonic(), "published": 0.0}

    def on_step(step: int, total: int) -> None:
        now = time.monotonic()
        per_step = (now - clock["start"]) / step
        rec.progress = StepProgress(
            step=step, total=total, percent=round(100.0 * step / total, 1),
            eta_s=round(per_step * (total - step), 2), s_per_step=per_step,
            # The step about to run: RSA for the first rsa_steps, then RBA.
            stage="rsa" if step < rsa_steps else "rba")
        try:
            records.write(job, rec)
            flag = rt.redis.get(cancel_key)
        except REDIS_DOWN as e:
            log.warning("job %s: step %d not reported: %s", job.id, step, e)
            return
        # Events at most every PROGRESS_INTERVAL_S (webhooks follow the stream), and
        # always the last step.
        if step == total or now - clock["published"] >= events.PROGRESS_INTERVAL_S:
            clock["published"] = now
            publish(rt, job, EventType.PROGRESS,
                    rec.progress.model_dump(include={"step", "total", "percent", "eta_s",
                                                     "stage"}))
        if (state := flag_state(flag)) is not None:
            raise JobCanceled(state)

    return on_step
