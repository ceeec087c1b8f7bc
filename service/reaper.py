"""Jobs whose worker died mid-run end `failed` / `worker_lost` even when no worker is
left to notice: every gateway replica and every worker run `reap`, and the first each
interval (a Redis lock) does the work. RQ's own started-job registry decides what is
abandoned (a job whose worker's heartbeat expired); this adds the terminal event that
clients, event streams and webhooks wait for. Gateway-safe: no torch."""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue

from . import events, jobs
from .keys import REAPER_LOCK
from .queueing import fetch_job

__all__ = ["reap"]

log = logging.getLogger("magicface.reaper")


def reap(redis: Redis, queue: Queue, record_ttl_s: int, interval_s: float,
         force: bool = False) -> list[str]:
    """Fail the queue's abandoned jobs and announce each one's end; the ids that ended.
    Without `force`, at most once per `interval_s` across all processes."""
    lock = REAPER_LOCK.format(queue.name)
    if not force and not redis.set(lock, "1", nx=True, px=max(1, int(interval_s * 1000))):
        return []
    registry = queue.started_job_registry
    before = set(registry.get_job_ids())
    if not before:
        return []
    registry.cleanup()
    ended = []
    for job_id in before:
        if events.has_terminal(redis, job_id):
            continue
        try:
            job = fetch_job(job_id, redis)
            # status_of on the fetched record first: the running jobs (most of them)
            # cost no refresh and no view.
            if jobs.status_of(job).terminal and jobs.publish_end(redis, job, queue,
                                                                 record_ttl_s):
                ended.append(job_id)
        except Exception as e:  # noqa: BLE001 - gone meanwhile, or Redis went away
            log.debug("job %s: not reconciled: %s", job_id, e)
    if ended:
        log.warning("jobs whose worker stopped answering, failed worker_lost: %s",
                    ", ".join(ended))
    return ended
