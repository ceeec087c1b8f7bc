"""The Redis key names the gateway and the workers share (RQ's own keys aside)."""

from __future__ import annotations

__all__ = ["REAPER_LOCK", "CANCEL_KEY", "IDEMPOTENCY_KEY", "WORKER_ALIVE_KEY", "METRICS_KEY",
           "DURATION_KEY", "EVENTS_KEY", "TERMINAL_KEY", "WEBHOOK_KEY", "WEBHOOK_LOG_KEY",
           "WEBHOOK_DUE_KEY", "DEADLINES_KEY", "OWNER_JOBS_KEY", "DELETED_KEY", "RETENTION_KEY",
           "QUEUED_OWNER_KEY", "WORKERS_KEY", "SWEEP_LOCK", "ORPHAN_LOCK", "FLAG_TTL_S",
           "TRACE_GRACE_S", "trace_ttl", "due_member", "parse_due_member", "retention_member",
           "parse_retention_member", "rq_job_key"]

# How long a job's flags (cancel, deleted) live: past any job's run.
FLAG_TTL_S = 86400
# A job's events and webhook state outlive its record by this much, so a client that
# reads the record's end can still read (and resume) its events.
TRACE_GRACE_S = 3600


def trace_ttl(record_ttl_s: int) -> int:
    """The TTL of a job's event stream and webhook keys, given its record's."""
    return int(record_ttl_s) + TRACE_GRACE_S


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
# A job's event stream (a capped Redis stream).
EVENTS_KEY = "magicface:events:{}"
# Set (NX) with a job's terminal event: the event is appended once.
TERMINAL_KEY = "magicface:events:{}:terminal"
# A job's webhook: a hash {url, events: ",queued,succeeded,..."}.
WEBHOOK_KEY = "magicface:webhook:{}"
# A job's webhook deliveries: a hash of delivery id -> JSON record.
WEBHOOK_LOG_KEY = "magicface:webhook_log:{}"
# Deliveries to attempt: a sorted set of `due_member`s by due time (ms).
WEBHOOK_DUE_KEY = "magicface:webhooks:due"


def due_member(job_id: str, event_id: str) -> str:
    """A delivery in WEBHOOK_DUE_KEY (events.py's Lua script writes the same form)."""
    return f"{job_id}|{event_id}"


def parse_due_member(member: str) -> tuple[str, str]:
    """(job id, event id) of a `due_member`."""
    job_id, _, event_id = member.partition("|")
    return job_id, event_id

# Deadlines (Cancel-After, QUEUE_TTL_S): a sorted set of job ids by deadline (s).
DEADLINES_KEY = "magicface:deadlines"
# Each owner's jobs: a sorted set of job ids by creation time (s), for GET /v1/jobs.
OWNER_JOBS_KEY = "magicface:owner:{}:jobs"
# A job deleted while running: hidden at once, removed by its worker when it stops.
DELETED_KEY = "magicface:deleted:{}"
# Ended jobs (`retention_member`s) by the time their retention ends (RESULT_TTL_S
# after the end): the sweeper deletes what is due.
RETENTION_KEY = "magicface:retention"


def retention_member(job_id: str, owner: str) -> str:
    """The member names the owner too, whose index the sweeper cleans once the record
    is gone."""
    return f"{job_id}:{owner}"


def parse_retention_member(member: str) -> tuple[str, str]:
    job_id, _, owner = member.partition(":")
    return job_id, owner

# Queued job -> its owner (per queue), for fair order and per-key quotas.
QUEUED_OWNER_KEY = "magicface:queued-owner:{}"
# Held (SET NX EX) by the one process that reaps abandoned jobs this interval.
REAPER_LOCK = "magicface:reaper-lock:{}"
# One process a sweep interval runs the retention sweep; one an orphan interval lists
# the bucket.
SWEEP_LOCK = "magicface:sweep-lock"
ORPHAN_LOCK = "magicface:orphan-sweep-lock"


def rq_job_key(job_id: str) -> str:
    """RQ's record of a job (RQ's name: `Job.key_for`), read where fetching the job
    would cost more than asking whether it exists."""
    return f"rq:job:{job_id}"
