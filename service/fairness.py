"""Fair queueing between API keys on one RQ queue.

RQ serves its queue (a Redis list) first in, first out, so one key's burst would delay
every other key's job by the whole burst. Here the queue is kept in round-robin order by
key: a new job of a key with k jobs queued goes before the first queued job that is some
key's (k+2)-th, i.e. it is served in "round" k, after every key's earlier rounds (ties in
arrival order). Key A's 100 queued jobs then delay key B's one job by at most one run.

The order is made at submission, atomically (one Lua script over the list and an owner
index), and workers dequeue with RQ's plain public dequeue, unchanged. The same index
counts each key's queued jobs for MAX_QUEUED_PER_KEY. Its cost per submission is the
queue's length (bounded by MAX_QUEUED).
"""

from __future__ import annotations

from redis import Redis
from rq import Queue

from .keys import QUEUED_OWNER_KEY

__all__ = ["note_owner", "place", "queued_for", "forget"]

# KEYS: the queue list, the job -> owner hash. ARGV: job id, owner.
# Moves the job (already pushed at the tail by RQ) to its round-robin place.
_PLACE = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
if #ids == 0 then return -1 end
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local mine, seen, found = 0, {}, false
for i = 1, #ids do
  if ids[i] == ARGV[1] then found = true
  elseif owners[i] == ARGV[2] then mine = mine + 1 end
end
if not found then return -1 end
for i = 1, #ids do
  if ids[i] ~= ARGV[1] then
    local o = owners[i] or ids[i]
    seen[o] = (seen[o] or 0) + 1
    if seen[o] > mine + 1 then
      redis.call('LREM', KEYS[1], 1, ARGV[1])
      redis.call('LINSERT', KEYS[1], 'BEFORE', ids[i], ARGV[1])
      return i - 1
    end
  end
end
return #ids - 1
"""

# KEYS: the queue list, the job -> owner hash. ARGV: owner. How many of the owner's
# jobs the queue holds.
_COUNT = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
if #ids == 0 then return 0 end
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local n = 0
for i = 1, #ids do if owners[i] == ARGV[1] then n = n + 1 end end
return n
"""


def _owners_key(queue: Queue) -> str:
    return QUEUED_OWNER_KEY.format(queue.name)


def note_owner(redis: Redis, queue: Queue, job_id: str, owner: str) -> None:
    """Record the queued job's owner (before it is pushed: `place` reads it)."""
    redis.hset(_owners_key(queue), job_id, owner)


def place(redis: Redis, queue: Queue, job_id: str, owner: str) -> int:
    """Move a just-enqueued job to its fair position; that position (0 = next), or -1
    when a worker already took it."""
    return int(redis.eval(_PLACE, 2, queue.key, _owners_key(queue), job_id, owner))


def queued_for(redis: Redis, queue: Queue, owner: str) -> int:
    """The owner's jobs waiting in the queue."""
    return int(redis.eval(_COUNT, 2, queue.key, _owners_key(queue), owner))


def forget(redis: Redis, queue_name: str, job_id: str) -> None:
    """The job left the queue for good (started, canceled, expired or deleted)."""
    redis.hdel(QUEUED_OWNER_KEY.format(queue_name), job_id)
