"""How jobs sit in Redis through RQ: JSON, never pickle.

RQ serializes a job's call (function name and arguments), its `meta` and its return
value with the serializer it is given, pickle by default; whoever can write to Redis
could then run code in any process that reads a job. Every queue, job and worker of
this service (gateway, worker and tests) is opened here, with `JobSerializer`, so a
record read from Redis is only ever parsed as JSON. A record that is not JSON (a job
queued by release 0.1, which pickled, or one planted by hand) is refused: the worker
fails it with `unreadable_job` without running it, and the gateway reports it so.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job

__all__ = ["JobSerializer", "UnreadableRecord", "SafeJob", "open_queue", "fetch_job",
           "fetch_jobs", "UNREADABLE_MESSAGE"]

# Pickle protocols 2 and up start with the PROTO opcode; named for a clear message.
_PICKLE_PROTO = b"\x80"
UNREADABLE_MESSAGE = ("this job's record in Redis is not JSON (jobs queued before release "
                      "0.2 were pickled, or it was written by hand): it was not run; "
                      "submit it again")


class UnreadableRecord(ValueError):
    """A value read from Redis is not this service's JSON."""


class JobSerializer:
    """RQ's serializer protocol (`dumps`, `loads`) over JSON. `loads` parses data and
    nothing else: any other bytes raise UnreadableRecord."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    @staticmethod
    def loads(data: bytes | str) -> Any:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if raw[:1] == _PICKLE_PROTO:
            raise UnreadableRecord("a pickle, which this service never loads")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise UnreadableRecord(f"not JSON: {e}") from None


class SafeJob(Job):
    """An RQ job that never imports a callback: RQ resolves a job's success, failure and
    stopped callbacks from names stored in its Redis hash, so a planted name would import
    and call any function (in the gateway too, which fails abandoned jobs). This service
    registers no callbacks."""

    @property
    def success_callback(self):
        return None

    @property
    def failure_callback(self):
        return None

    @property
    def stopped_callback(self):
        return None


def open_queue(name: str, redis: Redis, job_class: type[Job] = SafeJob) -> Queue:
    return Queue(name, connection=redis, serializer=JobSerializer, job_class=job_class)


def fetch_job(job_id: str, redis: Redis) -> Job:
    """The job (rq.exceptions.NoSuchJobError when absent), read as JSON."""
    return SafeJob.fetch(job_id, connection=redis, serializer=JobSerializer)


def fetch_jobs(job_ids: list[str], redis: Redis,
               job_class: type[Job] = SafeJob) -> list[Job | None]:
    return job_class.fetch_many(job_ids, connection=redis, serializer=JobSerializer)
