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
from typing import Any

from redis import Redis

from .keys import DEADLINES_KEY, EVENTS_KEY, WEBHOOK_DUE_KEY, WEBHOOK_KEY, WEBHOOK_LOG_KEY
from .schemas import TERMINAL_EVENTS, EventType

__all__ = ["publish", "read", "has_terminal", "delivery_id", "events_key", "PROGRESS_INTERVAL_S",
           "MAX_EVENTS"]

PROGRESS_INTERVAL_S = 0.5
# Progress is throttled, so a 200-step job writes well under this many events.
MAX_EVENTS = 1000

# KEYS: stream, terminal flag, webhook config, webhook log, due set.
# ARGV: type, data, ttl, terminal (0/1), now_ms, max events, delivery id prefix,
# job id.
# Appends the event (once, for a terminal one), refreshes the TTLs, and when the job
# has a webhook that wants this event, records a pending delivery and makes it due.
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
            ttl_s: int) -> str | None:
    """Append an event; its stream id, or None for a terminal event already there."""
    ttl = max(60, int(ttl_s))
    terminal = event in TERMINAL_EVENTS
    result = redis.eval(_PUBLISH, 5, EVENTS_KEY.format(job_id),
                        EVENTS_KEY.format(job_id) + ":terminal", WEBHOOK_KEY.format(job_id),
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
    return bool(redis.exists(EVENTS_KEY.format(job_id) + ":terminal"))


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
