"""The registry of live workers (for /readyz, ETAs and metrics), without SCAN.

Each worker writes its info under a key of its own with a short TTL (its heartbeat) and
its name into one sorted set per queue, scored by when that registration lapses. A
reader takes the names whose score is in the future (one ZRANGEBYSCORE), then their
info (one MGET), and drops lapsed names as it goes: the cost is the live workers, not
the keyspace."""

from __future__ import annotations

import json
import time

from redis import Redis

from .keys import WORKER_ALIVE_KEY, WORKERS_KEY

__all__ = ["register", "unregister", "live_workers"]


def register(redis: Redis, queue_name: str, name: str, info: dict, ttl_s: int) -> None:
    pipe = redis.pipeline()
    pipe.set(WORKER_ALIVE_KEY.format(name), json.dumps({**info, "queue": queue_name}),
             ex=ttl_s)
    pipe.zadd(WORKERS_KEY.format(queue_name), {name: time.time() + ttl_s})
    pipe.execute()


def unregister(redis: Redis, queue_name: str, name: str) -> None:
    pipe = redis.pipeline()
    pipe.delete(WORKER_ALIVE_KEY.format(name))
    pipe.zrem(WORKERS_KEY.format(queue_name), name)
    pipe.execute()


def live_workers(redis: Redis, queue_name: str, warm: bool | None = True) -> list[dict]:
    """The registered workers (with their model loaded) serving `queue_name`: the warm
    ones (ready: WARMUP_SHAPES compiled), the warming ones (`warm=False`), or all
    (`warm=None`). A worker from before warm-up existed counts as warm."""
    key = WORKERS_KEY.format(queue_name)
    now = time.time()
    redis.zremrangebyscore(key, "-inf", now)
    names = [n.decode() if isinstance(n, bytes) else n
             for n in redis.zrangebyscore(key, now, "+inf")]
    if not names:
        return []
    out = []
    for raw in redis.mget([WORKER_ALIVE_KEY.format(n) for n in names]):
        if raw is None:
            continue
        try:
            info = json.loads(raw)
        except ValueError:  # not a worker's record: ignored
            continue
        if not isinstance(info, dict) or not info.get("model_loaded"):
            continue
        if warm is None or bool(info.get("warm", True)) == warm:
            out.append(info)
    return out
