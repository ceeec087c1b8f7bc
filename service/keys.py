"""The Redis key names the gateway and the workers share (RQ's own keys aside)."""

from __future__ import annotations

__all__ = ["CANCEL_KEY", "IDEMPOTENCY_KEY", "WORKER_ALIVE_KEY", "METRICS_KEY", "DURATION_KEY"]

# A job's cancel flag: set by the gateway, read by the worker's step callback.
CANCEL_KEY = "magicface:cancel:{}"
# Idempotency-Key -> {"job_id", "hash"} of the first request that used it.
IDEMPOTENCY_KEY = "magicface:idem:{}"
# A worker's liveness record (JSON, short TTL): what /readyz reads.
WORKER_ALIVE_KEY = "magicface:worker:{}"
# Counters (a hash) and the job-duration histogram (a hash of cumulative buckets).
METRICS_KEY = "magicface:metrics"
DURATION_KEY = "magicface:metrics:duration"
