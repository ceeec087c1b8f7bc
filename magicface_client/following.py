"""Following a job to its end, in both clients: the server-sent event stream (one
connection, no polling delay, every progress step), reopened with Last-Event-ID when it
drops, and polling when the stream cannot be had. The loops are the clients' own (one
blocks, one awaits); what they decide at each step is here, so the two cannot drift."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from .models import TERMINAL, Job, JobFailed, MagicFaceError
from .sse import Event

__all__ = ["ProgressCallback", "ProgressReporter", "RECONNECTS", "STREAM_IDLE_S",
           "DEFAULT_RETRY_S", "stream_timeout", "check_deadline", "reconnect_delay",
           "may_poll", "poll_delay", "finished"]

ProgressCallback = Callable[[dict], None]
# A dropped event stream is reopened this many times in a row before giving up; any
# event received resets the count, so a long job survives many separate drops.
RECONNECTS = 5
# The server sends a keep-alive comment every 10 s: this long without a byte means the
# connection is dead (a silent proxy or NAT drop), and it is reopened.
STREAM_IDLE_S = 35.0
# Until the server's `retry:` is known: how long to wait before reopening a stream.
DEFAULT_RETRY_S = 2.0


def stream_timeout(base: httpx.Timeout, deadline: float | None) -> httpx.Timeout:
    read = STREAM_IDLE_S
    if deadline is not None:  # a read must not block past the caller's deadline
        read = max(0.05, min(read, deadline - time.monotonic()))
    return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)


def check_deadline(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"job {job_id} did not finish in time")


def reconnect_delay(drops: int, retry_s: float, deadline: float | None) -> float:
    """Soon after a first drop (usually a proxy's idle cut), then backing off up to the
    server's `retry:`; never past the deadline."""
    delay = min(retry_s, 0.25 * 2 ** (drops - 1))
    if deadline is not None:
        delay = min(delay, max(0.0, deadline - time.monotonic()))
    return delay


def may_poll(e: Exception) -> bool:
    """Whether `wait` may poll after the event stream failed with `e`: not when the job
    or the key is refused (polling would be refused the same way)."""
    return not (isinstance(e, MagicFaceError) and e.status in (401, 403, 404))


def poll_delay(deadline: float | None, job_id: str, poll_s: float) -> float:
    """The wait before the next poll (TimeoutError once the deadline has passed)."""
    check_deadline(deadline, job_id)
    return poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))


def finished(view: dict) -> Job:
    job = Job.from_view(view)
    if job.status != "succeeded":
        raise JobFailed(job)
    return job


class ProgressReporter:
    """What `wait` does with each stream event and each poll. Calls `on_progress` once
    per new progress (polling sees the same step many times; the stream and a poll after
    it may both report one step)."""

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        self.on_progress: ProgressCallback | None = on_progress
        self.last: dict | None = None

    def __call__(self, progress: dict | None) -> None:
        if self.on_progress is None or not progress or progress == self.last:
            return
        self.last = progress
        self.on_progress(progress)

    def event(self, event: Event) -> Job | None:
        """A stream event: progress reported; a terminal event's job (JobFailed unless
        it succeeded)."""
        if event.type == "progress":
            self(event.data)
        elif event.type in TERMINAL:
            return finished(event.data)
        return None

    def polled(self, job: Job) -> Job | None:
        """A polled job: progress reported; the job once done (JobFailed unless it
        succeeded)."""
        self(job.progress)
        return finished(job.raw) if job.done else None
