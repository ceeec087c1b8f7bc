"""`Client`: submit, follow, cancel, delete, list and download jobs, blocking.

`AsyncClient` (async_client.py) has the same methods as coroutines. Both build their
requests and read the answers with the same functions (transport, submission,
following, downloads), so they differ only in how they wait for the network.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from .async_client import AsyncClient
from .downloads import DOWNLOADS, check_what, redirect_target, save
from .following import (
    DEFAULT_RETRY_S,
    RECONNECTS,
    STREAM_IDLE_S,
    ProgressCallback,
    ProgressReporter,
    check_deadline,
    finished,
    may_poll,
    poll_delay,
    reconnect_delay,
    stream_timeout,
)
from .models import TERMINAL, Concept, Job, MagicFaceError
from .sse import Event, SSEParser
from .submission import held_timeout, submission
from .transport import VERSION, default_headers, list_params, raise_for

# AsyncClient and the tunables stay importable from here, where they were first defined.
__all__ = ["Client", "AsyncClient", "ProgressCallback", "VERSION", "RECONNECTS",
           "STREAM_IDLE_S", "DEFAULT_RETRY_S", "DOWNLOADS"]


class Client:
    """A synchronous client of the MagicFace service.

    `base_url` like `http://localhost:8000`; `api_key` is sent as a bearer token (needed
    when the server has API_KEYS); `timeout` bounds each request's connect and each read
    (event streams and `wait` have their own bounds). Other keyword arguments go to
    `httpx.Client` (e.g. `verify`, `transport`). Use it as a context manager, or `close()`.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 **httpx_kwargs: Any):
        self._http = httpx.Client(base_url=base_url, timeout=timeout,
                                  headers=default_headers(api_key), **httpx_kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        r = self._http.request(method, url, **kw)
        raise_for(r)
        return r

    def submit(self, prompt: str, concepts: Sequence[Concept], *, params: dict | None = None,
               webhook: str | None = None, webhook_events: Sequence[str] | None = None,
               idempotency_key: str | None = None, wait: int | None = None,
               cancel_after: str | float | None = None, json_body: bool = False) -> Job:
        """Queue a job and return its first view (status queued, or the finished job).

        The body is multipart (images as files: no base64 overhead) unless `json_body`,
        which inlines them as data: URIs. `params` are the generation parameters (steps,
        seed, width, ...). `webhook` gets signed events (`webhook_events`, default all but
        progress). The same `idempotency_key` and body within 24 h return the same job,
        so a submission may be retried safely. `wait` (<= 60 s) asks the server to hold
        the answer until the job ends. `cancel_after` (seconds or "5m") expires the job
        if it has not finished by then. Raises MagicFaceError (e.g. 422, 429 queue_full
        with `retry_after`).
        """
        kw = submission(prompt, concepts, params=params, webhook=webhook,
                         webhook_events=webhook_events, idempotency_key=idempotency_key,
                         wait=wait, cancel_after=cancel_after, json_body=json_body)
        r = self._call("POST", "/v1/jobs", timeout=held_timeout(self._http.timeout, wait),
                       **kw)
        return Job.from_view(r.json())

    def get(self, job_id: str) -> Job:
        """The job's current view; MagicFaceError 404 when there is no such job (or it
        is another key's, or deleted, or past its retention)."""
        return Job.from_view(self._call("GET", f"/v1/jobs/{job_id}").json())

    def list(self, status: str | None = None, limit: int = 20) -> Iterator[Job]:
        """Your jobs, newest first, optionally only those in `status`. Pages of `limit`
        are fetched as the iteration reaches them, so stopping early costs no more."""
        cursor = None
        while True:
            page = self._call("GET", "/v1/jobs", params=list_params(status, limit, cursor)
                              ).json()
            yield from (Job.from_view(v) for v in page["jobs"])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        """Cancel the job: a queued one at once (canceled), a running one at its next
        step (cancel_requested, then canceled). MagicFaceError 409 if it has ended."""
        return Job.from_view(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> None:
        """Delete the job with its inputs and outputs (canceling it if it runs)."""
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events as `(id, type, data)` from its first one (or after
        `last_event_id`) until its end: queued, started, progress (data: step, total,
        percent, eta_s, stage), then succeeded, failed, canceled or expired (data: the
        job's view). A dropped connection is reopened where it broke (Last-Event-ID),
        up to RECONNECTS times in a row, so no event is lost or repeated."""
        return self._follow(job_id, last_event_id, None)

    def _follow(self, job_id: str, last_event_id: str | None, deadline: float | None
                ) -> Iterator[Event]:
        drops, retry_s = 0, DEFAULT_RETRY_S
        while True:
            parser = SSEParser()
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                       timeout=stream_timeout(self._http.timeout, deadline)
                                       ) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise_for(r)
                    for line in r.iter_lines():
                        check_deadline(deadline, job_id)
                        event = parser.feed(line)
                        if event is None:
                            continue
                        drops, last_event_id = 0, event.id or last_event_id
                        yield event
                        if event.type in TERMINAL:
                            return
            except httpx.TransportError:
                check_deadline(deadline, job_id)
                drops += 1
                if drops > RECONNECTS:
                    raise
            else:
                # Closed without the job's end: the server does so when the job is gone
                # (get raises 404) or ended before `last_event_id`; else a proxy cut it.
                if self.get(job_id).done:
                    return
                drops += 1
                if drops > RECONNECTS:
                    raise ConnectionError(f"the event stream of job {job_id} keeps closing "
                                          "before the job's end")
            if parser.retry_ms is not None:
                retry_s = parser.retry_ms / 1000
            time.sleep(reconnect_delay(drops, retry_s, deadline))

    def wait(self, job_id: str, on_progress: ProgressCallback | None = None,
             timeout: float | None = None, poll_s: float = 1.0) -> Job:
        """The job once it has succeeded.

        Follows the event stream, calling `on_progress` with each progress dict (step,
        total, percent, eta_s, stage); when the stream cannot be opened (a proxy that
        refuses or buffers it), polls every `poll_s` seconds instead. Raises JobFailed
        (with the final job) if it fails, is canceled or expires, TimeoutError after
        `timeout` seconds (the job goes on: cancel it if it is not wanted).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        report = ProgressReporter(on_progress)
        try:
            for event in self._follow(job_id, None, deadline):
                if (done := report.event(event)) is not None:
                    return done
        except (httpx.TransportError, ConnectionError, MagicFaceError) as e:
            if not may_poll(e):
                raise
        while (done := report.polled(self.get(job_id))) is None:
            time.sleep(poll_delay(deadline, job_id, poll_s))
        return done

    def download(self, job_id: str, path: str | Path | None = None,
                 what: str = "image") -> bytes:
        """The job's PNG (`what`: image or semantic_map), also written to `path` when
        given. MagicFaceError 409 (not_ready) before the job succeeds, 410 after it
        failed. A redirect to presigned storage is followed without the API key."""
        check_what(what)
        r = self._http.get(f"/v1/jobs/{job_id}/{what}")
        if r.is_redirect:
            url, same = redirect_target(r, self._http.base_url)
            if same:
                r = self._http.get(url)
            else:
                with httpx.Client(timeout=self._http.timeout, follow_redirects=True) as plain:
                    r = plain.get(url)
        raise_for(r)
        return save(r.content, path)

    def run(self, prompt: str, concepts: Sequence[Concept], path: str | Path | None = None,
            *, on_progress: ProgressCallback | None = None, timeout: float | None = None,
            **submit_kw: Any) -> bytes:
        """Submit, wait and download in one call: the image's PNG bytes (also written to
        `path` when given). `submit_kw` are `submit`'s options (params, json_body, ...).
        Raises as `submit` and `wait` do."""
        job = self.submit(prompt, concepts, **submit_kw)
        if job.done:  # the server held the answer (wait=) until the end
            finished(job.raw)
        else:
            self.wait(job.id, on_progress=on_progress, timeout=timeout)
        return self.download(job.id, path)
