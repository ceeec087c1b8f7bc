"""The Redis key names the gateway and the workers share (RQ's own keys aside)."""

from __future__ import annotations

__all__ = ["REAPER_LOCK", "CANCEL_KEY", "IDEMPOTENCY_KEY", "WORKER_ALIVE_KEY", "METRICS_KEY",
           "DURATION_KEY", "EVENTS_KEY", "WEBHOOK_KEY", "WEBHOOK_LOG_KEY", "WEBHOOK_DUE_KEY",
           "DEADLINES_KEY", "OWNER_JOBS_KEY", "DELETED_KEY", "RETENTION_KEY", "QUEUED_OWNER_KEY",
           "WORKERS_KEY"]

# A job's cancel flag: set by the gateway, read by the worker's step callback.
CANCEL_KEY = "magicface:cancel:{}"
# Idempotency-Key -> {"job_id", "hash"} of the first request that used it.
IDEMPOTENCY_KEY = "magicface:idem:{}"
# A worker's liveness record (JSON, short TTL): what /readyz reads.
WORKER_ALIVE_KEY = "magicface:worker:{}"
# Per queue: worker name -> when its registration lapses (service.workers).
WORKERS_KEY = "magicface:workers:{}"
# Counters (a hash) and the job-duration histogram (a hash of cumulative buckets).
METRICS_KEY = "magicface:metrics"
DURATION_KEY = "magicface:metrics:duration"
# A job's event stream (a capped Redis stream; "<key>:terminal" marks its end event).
EVENTS_KEY = "magicface:events:{}"
# A job's webhook: a hash {url, events: ",queued,succeeded,..."}.
WEBHOOK_KEY = "magicface:webhook:{}"
# A job's webhook deliveries: a hash of delivery id -> JSON record.
WEBHOOK_LOG_KEY = "magicface:webhook_log:{}"
# Deliveries to attempt: a sorted set of "<job>|<event id>" by due time (ms).
WEBHOOK_DUE_KEY = "magicface:webhooks:due"
# Deadlines (Cancel-After, QUEUE_TTL_S): a sorted set of job ids by deadline (s).
DEADLINES_KEY = "magicface:deadlines"
# Each owner's jobs: a sorted set of job ids by creation time (s), for GET /v1/jobs.
OWNER_JOBS_KEY = "magicface:owner:{}:jobs"
# A job deleted while running: hidden at once, removed by its worker when it stops.
DELETED_KEY = "magicface:deleted:{}"
# Ended jobs by the time their retention ends (RESULT_TTL_S after the end): the
# sweeper deletes what is due.
RETENTION_KEY = "magicface:retention"
# Queued job -> its owner (per queue), for fair order and per-key quotas.
QUEUED_OWNER_KEY = "magicface:queued-owner:{}"
# Held (SET NX EX) by the one process that reaps abandoned jobs this interval.
REAPER_LOCK = "magicface:reaper-lock:{}"
