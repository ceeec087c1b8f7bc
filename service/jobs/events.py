"""Each job's event log: a capped Redis stream that the SSE route reads (resumable by
event id, so a gateway restart loses nothing), and that schedules the job's webhook
deliveries as events are appended.

Producers: the gateway (queued; canceled while queued), the worker (started,
progress at most every PROGRESS_INTERVAL_S, the terminal event once RQ has recorded
the end), the worker's maintenance (a job whose worker died). A terminal event is
appended at most once per job, atomically with its webhook delivery.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from ..keys import (
    DEADLINES_KEY,
    EVENTS_KEY,
    TERMINAL_KEY,
    WEBHOOK_DUE_KEY,
    WEBHOOK_KEY,
    WEBHOOK_LOG_KEY,
    trace_ttl,
)
from ..schemas import TERMINAL_EVENTS, EventType

__all__ = ["publish", "read", "has_terminal", "delivery_id", "events_key", "PROGRESS_INTERVAL_S",
           "MAX_EVENTS", "wait_for_end", "follow", "SSE_POLL_S"]

PROGRESS_INTERVAL_S = 0.5
# Progress is throttled, so a 200-step job writes well under this many events.
MAX_EVENTS = 1000

# KEYS: stream, terminal flag, webhook config, webhook log, due set.
# ARGV: type, data, ttl, terminal (0/1), now_ms, max events, delivery id prefix,
# job id.
# Appends the event (once, for a terminal one), refreshes the TTLs, and when the job
# has a webhook that wants this event, records a pending delivery and makes it due
# (its member in the due set is keys.due_member's "<job>|<event id>").
_PUBLISH = """
if ARGV[4] == '1' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then return false end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*',
                      'type', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local events = redis.call('HGET', KEYS[3], 'events')
if events and string.find(events, ',' .. ARGV[1] .. ',', 1, true) then
  local did = ARGV[7] .. '_' .. id
  local rec = cjson.encode({id=did, event=ARGV[1], event_id=id, status='pending',
                            attempts=0, next_attempt_at=tonumber(ARGV[5]) / 1000})
  redis.call('HSET', KEYS[4], did, rec)
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  redis.call('ZADD', KEYS[5], ARGV[5], ARGV[8] .. '|' .. id)
end
return id
"""


def delivery_id(job_id: str, event_id: str) -> str:
    """The webhook-id of an event's delivery: the same on every retry and redelivery,
    so receivers can drop duplicates."""
    return f"msg_{job_id}_{event_id}"


def publish(redis: Redis, job_id: str, event: EventType, data: dict[str, Any],
            record_ttl_s: int) -> str | None:
    """Append an event; its stream id, or None for a terminal event already there. The
    stream lives `keys.trace_ttl(record_ttl_s)`."""
    ttl = max(60, trace_ttl(record_ttl_s))
    terminal = event in TERMINAL_EVENTS
    result = redis.eval(_PUBLISH, 5, EVENTS_KEY.format(job_id),
                        TERMINAL_KEY.format(job_id), WEBHOOK_KEY.format(job_id),
                        WEBHOOK_LOG_KEY.format(job_id), WEBHOOK_DUE_KEY,
                        event.value, json.dumps(data, default=str), ttl,
                        "1" if terminal else "0", int(time.time() * 1000), MAX_EVENTS,
                        f"msg_{job_id}", job_id)
    if terminal:
        redis.zrem(DEADLINES_KEY, job_id)
    return result.decode() if isinstance(result, bytes) else result


def events_key(job_id: str) -> str:
    return EVENTS_KEY.format(job_id)


def has_terminal(redis: Redis, job_id: str) -> bool:
    return bool(redis.exists(TERMINAL_KEY.format(job_id)))


def read(redis: Redis, job_id: str, after: str = "0-0", block_ms: int | None = None,
         count: int = 100) -> list[tuple[str, EventType, dict[str, Any]]]:
    """Events after `after` (a stream id; "0-0": from the start), oldest first;
    blocking up to `block_ms` for the first one when given."""
    key = EVENTS_KEY.format(job_id)
    if block_ms is None:
        rows = redis.xrange(key, min=f"({after}" if after != "0-0" else "-", count=count)
    else:
        got = redis.xread({key: after}, count=count, block=block_ms)
        rows = got[0][1] if got else []
    return [_decode(i, f) for i, f in rows]


def _decode(event_id, fields) -> tuple[str, EventType, dict[str, Any]]:
    eid = event_id.decode() if isinstance(event_id, bytes) else event_id
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    return eid, EventType(_s(f["type"])), json.loads(f["data"])


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


# How long one blocking read of a job's events waits before the stream checks the job
# (and sends a keep-alive comment).
SSE_POLL_S = 10.0
_TERMINAL = {e.value for e in TERMINAL_EVENTS}


async def wait_for_end(aredis: AsyncRedis, job_id: str, seconds: float) -> bool:
    """Whether the job's terminal event arrives within `seconds`."""
    deadline = time.monotonic() + seconds
    last = "0-0"
    while (left := deadline - time.monotonic()) > 0:
        got = await aredis.xread({events_key(job_id): last}, count=100,
                                 block=max(1, int(min(left, SSE_POLL_S) * 1000)))
        for eid, fields in (got[0][1] if got else []):
            last = eid
            if fields[b"type"].decode() in _TERMINAL:
                return True
    return False


async def follow(aredis: AsyncRedis, job_id: str, last: str,
                 reconcile: Callable[[], Awaitable[str]]) -> AsyncIterator[str]:
    """The job's events after `last` as server-sent events, until its terminal one.
    When nothing new arrives for SSE_POLL_S, `reconcile()` says whether the job is
    "live", has "ended" (its terminal event is in the log now) or is "gone"."""
    key = events_key(job_id)
    yield "retry: 2000\n\n"
    while True:
        got = await aredis.xread({key: last}, count=100, block=int(SSE_POLL_S * 1000))
        rows = got[0][1] if got else []
        for eid, fields in rows:
            last = eid.decode()
            kind = fields[b"type"].decode()
            yield f"id: {last}\nevent: {kind}\ndata: {fields[b'data'].decode()}\n\n"
            if kind in _TERMINAL:
                return
        if rows:
            continue
        # Nothing new: the job may have ended without its event (its worker died
        # before RQ noticed), its end may lie before `last` (a resume after the end),
        # or its record may be gone (expired, deleted).
        state = await reconcile()
        if state == "gone":
            return
        if state == "ended" and not await aredis.xread({key: last}, count=1):
            return
        yield ": keep-alive\n\n"
