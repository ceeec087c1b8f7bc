"""A job's webhook deliveries: the log the API lists, and a redelivery on request (the
worker's delivery loop sends what is due)."""

from __future__ import annotations

import json
import time

from redis import Redis

from ..errors import ApiError
from ..keys import WEBHOOK_DUE_KEY, WEBHOOK_LOG_KEY, due_member
from ..schemas import WebhookDelivery

__all__ = ["deliveries", "redeliver"]


def deliveries(redis: Redis, job_id: str) -> list[WebhookDelivery]:
    """Oldest event first."""
    raw = redis.hgetall(WEBHOOK_LOG_KEY.format(job_id))
    rows = sorted((json.loads(v) for v in raw.values()),
                  key=lambda r: tuple(int(x) for x in r["event_id"].split("-")))
    return [WebhookDelivery(**r) for r in rows]


def redeliver(redis: Redis, job_id: str, delivery_id: str) -> WebhookDelivery:
    """Make the delivery due now (the same webhook-id, so receivers can drop it)."""
    log_key = WEBHOOK_LOG_KEY.format(job_id)
    raw = redis.hget(log_key, delivery_id[:200])
    if raw is None:
        raise ApiError(404, "not_found", f"job {job_id} has no delivery {delivery_id[:80]!r}")
    rec = json.loads(raw)
    rec.update(status="pending", next_attempt_at=time.time(), redelivery=True,
               first_attempt_at=None)
    redis.hset(log_key, delivery_id, json.dumps(rec))
    redis.zadd(WEBHOOK_DUE_KEY, {due_member(job_id, rec["event_id"]): time.time() * 1000})
    return WebhookDelivery(**rec)
