"""Webhook delivery: a loop that takes due deliveries from Redis, POSTs each signed
event to its job's webhook, and records the outcome in the job's delivery log.

Runs as a thread in every worker (WEBHOOK_DELIVERY=true) and on its own as
`python -m worker.webhooks`; any number may run at once. A delivery is claimed by
moving its due time past the attempt's timeout (a lease): a deliverer that dies
mid-attempt leaves it due again, so every event is delivered at least once (receivers
drop repeats by `webhook-id`, which stays the same across retries). Failed attempts
back off exponentially (WEBHOOK_BACKOFF_S, x3 each time, at most
WEBHOOK_BACKOFF_MAX_S) for WEBHOOK_RETRY_FOR_S, then the delivery is marked failed;
`POST .../redeliver` starts it again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import httpx
from redis import Redis

from service import keys, remote, webhooks
from service.jobs import events
from service.schemas import EventType
from service.settings import Settings

__all__ = ["Deliverer", "main"]

log = logging.getLogger("magicface.webhooks")

# Take the due deliveries (up to ARGV[3]) and push their due time to the lease's end.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
"""
CONCURRENCY = 8


class Deliverer:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis, self.settings = redis, settings
        self.secrets = settings.webhook_secrets
        self.http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                                 headers={"user-agent": "MagicFace-Webhooks/1"})
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="webhook")

    def run(self, stop: threading.Event, interval_s: float = 0.2) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception as e:  # noqa: BLE001 - Redis may come back
                log.warning("webhook round failed: %s", e)
                busy = 0
            if not busy:
                stop.wait(interval_s)
        self.pool.shutdown(wait=True)
        self.http.close()

    def run_once(self) -> int:
        """Attempt the due deliveries (in parallel); how many were attempted."""
        now = time.time()
        lease = (now + self.settings.webhook_timeout_s + 30) * 1000
        due = self.redis.eval(_CLAIM, 1, keys.WEBHOOK_DUE_KEY, now * 1000, lease, CONCURRENCY)
        members = [m.decode() if isinstance(m, bytes) else m for m in due]
        for f in [self.pool.submit(self.attempt, m) for m in members]:
            f.result()
        return len(members)

    def attempt(self, member: str) -> None:
        job_id, event_id = keys.parse_due_member(member)
        did = events.delivery_id(job_id, event_id)
        log_key = keys.WEBHOOK_LOG_KEY.format(job_id)
        raw = self.redis.hget(log_key, did)
        hook = self.redis.hgetall(keys.WEBHOOK_KEY.format(job_id))
        rows = self.redis.xrange(events.events_key(job_id), event_id, event_id)
        if raw is None or not hook or not rows:  # the job expired or was deleted
            self.redis.zrem(keys.WEBHOOK_DUE_KEY, member)
            return
        rec = json.loads(raw)
        url = hook[b"url"].decode()
        fields = rows[0][1]
        event = EventType(fields[b"type"].decode())
        body = json.dumps({"type": webhooks.payload_type(event),
                           "timestamp": _event_time(event_id),
                           "data": json.loads(fields[b"data"])}).encode()
        status_code, error = None, None
        try:
            ts = int(time.time())
            # Resolved and checked at every attempt (the name may resolve elsewhere by
            # now), and sent to the address checked.
            with remote.pinned_stream(
                    self.http, "POST", url, schemes=("https", "http"),
                    allow_private=self.settings.webhook_allow_private, content=body,
                    headers={"content-type": "application/json", "webhook-id": did,
                             "webhook-timestamp": str(ts),
                             "webhook-signature": webhooks.signature_header(
                                 self.secrets, did, ts, body)}) as r:
                status_code = r.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except remote.AddressRefused as e:
            error = f"refused: {e}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}"
        self._record(member, log_key, did, rec, status_code, error)

    def _record(self, member: str, log_key: str, did: str, rec: dict,
                status_code: int | None, error: str | None) -> None:
        now = time.time()
        rec["attempts"] = int(rec.get("attempts", 0)) + 1
        rec["last_attempt_at"] = now
        rec["last_status_code"] = status_code
        rec["last_error"] = error
        rec.setdefault("first_attempt_at", None)
        if rec["first_attempt_at"] is None:
            rec["first_attempt_at"] = now
        if error is None:
            rec.update(status="delivered", delivered_at=now, next_attempt_at=None)
            self.redis.zrem(keys.WEBHOOK_DUE_KEY, member)
        elif now - rec["first_attempt_at"] >= self.settings.webhook_retry_for_s:
            rec.update(status="failed", next_attempt_at=None)
            self.redis.zrem(keys.WEBHOOK_DUE_KEY, member)
            log.warning("webhook %s: giving up after %d attempts (%s)", did,
                        rec["attempts"], error)
        else:
            delay = min(self.settings.webhook_backoff_s * 3 ** (rec["attempts"] - 1),
                        self.settings.webhook_backoff_max_s)
            rec.update(status="pending", next_attempt_at=now + delay)
            self.redis.zadd(keys.WEBHOOK_DUE_KEY, {member: (now + delay) * 1000})
        self.redis.hset(log_key, did, json.dumps(rec))


def _event_time(event_id: str) -> str:
    ms = int(event_id.split("-")[0])
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def start_thread(redis: Redis, settings: Settings) -> tuple[threading.Thread, threading.Event]:
    """A deliverer on a daemon thread of this process; set the event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=Deliverer(redis, settings).run, args=(stop,),
                              name="webhooks", daemon=True)
    thread.start()
    return thread, stop


def main() -> None:
    """`python -m worker.webhooks`: a deliverer on its own (no model, no GPU)."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    if not settings.webhook_secrets:
        raise SystemExit("WEBHOOK_SECRET is unset: there is nothing to sign deliveries with")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("delivering webhooks")
    Deliverer(Redis.from_url(settings.redis_url, socket_timeout=30), settings).run(stop)


if __name__ == "__main__":
    main()
