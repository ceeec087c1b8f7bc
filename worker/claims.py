"""Claiming queued jobs for a batch: a Lua script moves a job from the queue to RQ's
intermediate queue if it is still queued (another worker may have taken it), as RQ's
own dequeue moves it, so a worker that dies before starting it leaves it to RQ's
clean-up."""

from __future__ import annotations

from rq import Queue

__all__ = ["BATCH_SCAN", "claim"]

# How many queued jobs a worker looks at for companions of its job.
BATCH_SCAN = 64

# Moves a queued job to the intermediate queue if it is still queued (another worker
# may have taken it): 1 when claimed.
_CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[1])
    return 1
end
return 0
"""


def claim(queue: Queue, job_id: str) -> bool:
    return bool(queue.connection.eval(_CLAIM, 2, queue.key, queue.intermediate_queue_key,
                                      job_id))
