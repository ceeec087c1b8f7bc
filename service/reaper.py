"""Jobs whose worker died mid-run end `failed` / `worker_lost` even when no worker is
left to notice: every gateway replica and every worker run `reap`, and the first each
interval (a Redis lock) does the work. RQ's own started-job registry decides what is
abandoned (a job whose worker's heartbeat expired); this adds the terminal event that
clients, event streams and webhooks wait for. Gateway-safe: no torch.

A Redis that has just restarted (from its append-only file) holds heartbeat deadlines
that passed while it was down: every running job would look abandoned. So nothing is
reaped until the server has been up for `settle_s` (callers pass a heartbeat TTL plus a
maintenance interval), which gives each live worker several beats to renew its entry."""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue

from . import jobs
from .jobs import events
from .keys import REAPER_LOCK
from .queueing import fetch_job

__all__ = ["reap", "settled"]

log = logging.getLogger("magicface.reaper")


def settled(redis: Redis, settle_s: float) -> bool:
    """Whether the Redis server has been up long enough for heartbeats to be trusted."""
    if settle_s <= 0:
        return True
    uptime = redis.info("server").get("uptime_in_seconds")
    return uptime is None or float(uptime) >= settle_s


def reap(redis: Redis, queue: Queue, record_ttl_s: int, interval_s: float,
         force: bool = False, settle_s: float = 0.0) -> list[str]:
    """Fail the queue's abandoned jobs and announce each one's end; the ids that ended.
    Without `force`, at most once per `interval_s` across all processes; nothing while
    the Redis server is younger than `settle_s` (see the module's note)."""
    if not settled(redis, settle_s):
        return []
    lock = REAPER_LOCK.format(queue.name)
    if not force and not redis.set(lock, "1", nx=True, px=max(1, int(interval_s * 1000))):
        return []
    registry = queue.started_job_registry
    # Without cleanup: listing must not fail the jobs before they are noted here.
    before = set(registry.get_job_ids(cleanup=False))
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
