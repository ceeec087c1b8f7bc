"""`Client` and `AsyncClient`: submit, follow, cancel, delete, list and download jobs.

Requests are built and answers read by the module's functions, shared by both classes;
the classes differ only in how they wait for the network. Following a job uses the
server-sent event stream (one connection, no polling delay, every progress step), resumed
with Last-Event-ID when the connection drops, and polling when the stream cannot be had.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from magicface_core.version import __version__

from .models import (
    TERMINAL,
    Concept,
    Job,
    JobFailed,
    MagicFaceError,
    check_concepts,
    image_bytes,
    image_kind,
)
from .sse import Event, SSEParser

__all__ = ["Client", "AsyncClient", "ProgressCallback", "VERSION"]

VERSION = __version__
ProgressCallback = Callable[[dict], None]
# A dropped event stream is reopened this many times in a row before giving up; any
# event received resets the count, so a long job survives many separate drops.
RECONNECTS = 5
# The server sends a keep-alive comment every 10 s: this long without a byte means the
# connection is dead (a silent proxy or NAT drop), and it is reopened.
STREAM_IDLE_S = 35.0
# Until the server's `retry:` is known: how long to wait before reopening a stream.
DEFAULT_RETRY_S = 2.0
DOWNLOADS = ("image", "semantic_map")


# -- requests ---------------------------------------------------------------------------
def _default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"magicface-client/{VERSION}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _submission(prompt: str, concepts: Sequence[Concept], *, params: dict | None,
                webhook: str | None, webhook_events: Sequence[str] | None,
                idempotency_key: str | None, wait: int | None,
                cancel_after: str | float | None, json_body: bool) -> dict[str, Any]:
    """httpx keyword arguments (body and headers) of POST /v1/jobs."""
    check_concepts(concepts)
    headers: dict[str, str] = {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if wait is not None:
        headers["Prefer"] = f"wait={int(wait)}"
    if cancel_after is not None:
        headers["Cancel-After"] = (f"{cancel_after:g}" if isinstance(cancel_after, (int, float))
                                   else str(cancel_after))
    if isinstance(webhook_events, str):
        webhook_events = [e.strip() for e in webhook_events.split(",") if e.strip()]
    if json_body:
        body: dict[str, Any] = {"prompt": prompt, "concepts": [c.json_spec() for c in concepts]}
        if params:
            body["params"] = params
        if webhook:
            body["webhook"] = webhook
            if webhook_events:
                body["webhook_events"] = list(webhook_events)
        return {"json": body, "headers": headers}
    data = {"prompt": prompt, "concepts": json.dumps([c.spec() for c in concepts])}
    if params:
        data["params"] = json.dumps(params)
    if webhook:
        data["webhook"] = webhook
        if webhook_events:
            data["webhook_events"] = ",".join(webhook_events)
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    for field, images in (("images", [c.image for c in concepts]),
                          ("masks", [c.mask for c in concepts if c.mask is not None])):
        for i, image in enumerate(images):
            raw = image_bytes(image)
            mime, suffix = image_kind(raw)
            files.append((field, (f"{field[:-1]}{i}.{suffix}", raw, mime)))
    return {"data": data, "files": files, "headers": headers}


def _list_params(status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    q: dict[str, Any] = {"limit": limit}
    if status:
        q["status"] = status
    if cursor:
        q["cursor"] = cursor
    return q


def _held_timeout(base: httpx.Timeout, wait: int | None) -> httpx.Timeout:
    """The read timeout of a submission the server may hold `wait` seconds (Prefer)."""
    if wait is None or base.read is None:
        return base
    return httpx.Timeout(connect=base.connect, read=base.read + wait, write=base.write,
                         pool=base.pool)


def _stream_timeout(base: httpx.Timeout, deadline: float | None) -> httpx.Timeout:
    read = STREAM_IDLE_S
    if deadline is not None:  # a read must not block past the caller's deadline
        read = max(0.05, min(read, deadline - time.monotonic()))
    return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)


def _check_what(what: str) -> None:
    if what not in DOWNLOADS:
        raise ValueError(f"what: one of {', '.join(DOWNLOADS)}, not {what!r}")


# -- answers ----------------------------------------------------------------------------
def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110 allows both)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _raise_for(r: httpx.Response) -> None:
    """MagicFaceError for an error answer. The body is read first (call after
    `read()`/`aread()` on a streamed response); a body that is not the service's error
    object (a proxy's page) becomes code `http_error` with the text's start."""
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", (r.text[:200] or r.reason_phrase)
    raise MagicFaceError(r.status_code, code, message, _retry_after(r.headers.get("Retry-After")))


def _finished(view: dict) -> Job:
    job = Job.from_view(view)
    if job.status != "succeeded":
        raise JobFailed(job)
    return job


def _may_poll(e: Exception) -> bool:
    """Whether `wait` may poll after the event stream failed with `e`: not when the job
    or the key is refused (polling would be refused the same way)."""
    return not (isinstance(e, MagicFaceError) and e.status in (401, 403, 404))


def _check_deadline(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"job {job_id} did not finish in time")


def _reconnect_delay(drops: int, retry_s: float, deadline: float | None) -> float:
    """Soon after a first drop (usually a proxy's idle cut), then backing off up to the
    server's `retry:`; never past the deadline."""
    delay = min(retry_s, 0.25 * 2 ** (drops - 1))
    if deadline is not None:
        delay = min(delay, max(0.0, deadline - time.monotonic()))
    return delay


def _redirect_target(r: httpx.Response, base: httpx.URL) -> tuple[httpx.URL, bool]:
    """Where a download redirect points, and whether it is the API's own origin (only
    then may the API key go along: a presigned storage URL carries its own
    authorization and must not learn the key)."""
    url = r.url.join(r.headers["location"])
    same = (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
    return url, same


def _save(content: bytes, path: str | Path | None) -> bytes:
    if path is not None:
        Path(path).write_bytes(content)
    return content


class _ProgressReporter:
    """What `wait` does with each stream event and each poll, in both clients. Calls
    `on_progress` once per new progress (polling sees the same step many times; the
    stream and a poll after it may both report one step)."""

    def __init__(self, on_progress: ProgressCallback | None):
        self.on_progress, self.last = on_progress, None

    def __call__(self, progress: dict | None) -> None:
        if self.on_progress is None or not progress or progress == self.last:
            return
        self.last = progress
        self.on_progress(progress)

    def event(self, event) -> Job | None:
        """A stream event: progress reported; a terminal event's job (JobFailed unless
        it succeeded)."""
        if event.type == "progress":
            self(event.data)
        elif event.type in TERMINAL:
            return _finished(event.data)
        return None

    def polled(self, job: Job) -> Job | None:
        """A polled job: progress reported; the job once done (JobFailed unless it
        succeeded)."""
        self(job.progress)
        return _finished(job.raw) if job.done else None


def _poll_delay(deadline: float | None, job_id: str, poll_s: float) -> float:
    """The wait before the next poll (TimeoutError once the deadline has passed)."""
    _check_deadline(deadline, job_id)
    return poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))


# -- the clients ------------------------------------------------------------------------
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
                                  headers=_default_headers(api_key), **httpx_kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        r = self._http.request(method, url, **kw)
        _raise_for(r)
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
        kw = _submission(prompt, concepts, params=params, webhook=webhook,
                         webhook_events=webhook_events, idempotency_key=idempotency_key,
                         wait=wait, cancel_after=cancel_after, json_body=json_body)
        r = self._call("POST", "/v1/jobs", timeout=_held_timeout(self._http.timeout, wait),
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
            page = self._call("GET", "/v1/jobs", params=_list_params(status, limit, cursor)
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
                                       timeout=_stream_timeout(self._http.timeout, deadline)
                                       ) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_for(r)
                    for line in r.iter_lines():
                        _check_deadline(deadline, job_id)
                        event = parser.feed(line)
                        if event is None:
                            continue
                        drops, last_event_id = 0, event.id or last_event_id
                        yield event
                        if event.type in TERMINAL:
                            return
            except httpx.TransportError:
                _check_deadline(deadline, job_id)
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
            time.sleep(_reconnect_delay(drops, retry_s, deadline))

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
        report = _ProgressReporter(on_progress)
        try:
            for event in self._follow(job_id, None, deadline):
                if (done := report.event(event)) is not None:
                    return done
        except (httpx.TransportError, ConnectionError, MagicFaceError) as e:
            if not _may_poll(e):
                raise
        while (done := report.polled(self.get(job_id))) is None:
            time.sleep(_poll_delay(deadline, job_id, poll_s))
        return done

    def download(self, job_id: str, path: str | Path | None = None,
                 what: str = "image") -> bytes:
        """The job's PNG (`what`: image or semantic_map), also written to `path` when
        given. MagicFaceError 409 (not_ready) before the job succeeds, 410 after it
        failed. A redirect to presigned storage is followed without the API key."""
        _check_what(what)
        r = self._http.get(f"/v1/jobs/{job_id}/{what}")
        if r.is_redirect:
            url, same = _redirect_target(r, self._http.base_url)
            if same:
                r = self._http.get(url)
            else:
                with httpx.Client(timeout=self._http.timeout, follow_redirects=True) as plain:
                    r = plain.get(url)
        _raise_for(r)
        return _save(r.content, path)

    def run(self, prompt: str, concepts: Sequence[Concept], path: str | Path | None = None,
            *, on_progress: ProgressCallback | None = None, timeout: float | None = None,
            **submit_kw: Any) -> bytes:
        """Submit, wait and download in one call: the image's PNG bytes (also written to
        `path` when given). `submit_kw` are `submit`'s options (params, json_body, ...).
        Raises as `submit` and `wait` do."""
        job = self.submit(prompt, concepts, **submit_kw)
        if job.done:  # the server held the answer (wait=) until the end
            _finished(job.raw)
        else:
            self.wait(job.id, on_progress=on_progress, timeout=timeout)
        return self.download(job.id, path)


class AsyncClient:
    """The asyncio client: the methods of `Client`, as coroutines (`list` and `events`
    are async iterators). Use `async with AsyncClient(...) as c`, or `aclose()`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 **httpx_kwargs: Any):
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                       headers=_default_headers(api_key), **httpx_kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        r = await self._http.request(method, url, **kw)
        _raise_for(r)
        return r

    async def submit(self, prompt: str, concepts: Sequence[Concept], *,
                     params: dict | None = None, webhook: str | None = None,
                     webhook_events: Sequence[str] | None = None,
                     idempotency_key: str | None = None, wait: int | None = None,
                     cancel_after: str | float | None = None, json_body: bool = False) -> Job:
        """See `Client.submit`."""
        kw = _submission(prompt, concepts, params=params, webhook=webhook,
                         webhook_events=webhook_events, idempotency_key=idempotency_key,
                         wait=wait, cancel_after=cancel_after, json_body=json_body)
        r = await self._call("POST", "/v1/jobs",
                             timeout=_held_timeout(self._http.timeout, wait), **kw)
        return Job.from_view(r.json())

    async def get(self, job_id: str) -> Job:
        """See `Client.get`."""
        return Job.from_view((await self._call("GET", f"/v1/jobs/{job_id}")).json())

    async def list(self, status: str | None = None, limit: int = 20) -> AsyncIterator[Job]:
        """See `Client.list` (`async for job in c.list()`)."""
        cursor = None
        while True:
            r = await self._call("GET", "/v1/jobs", params=_list_params(status, limit, cursor))
            page = r.json()
            for v in page["jobs"]:
                yield Job.from_view(v)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def cancel(self, job_id: str) -> Job:
        """See `Client.cancel`."""
        return Job.from_view((await self._call("POST", f"/v1/jobs/{job_id}/cancel")).json())

    async def delete(self, job_id: str) -> None:
        """See `Client.delete`."""
        await self._call("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """See `Client.events` (`async for event_id, kind, data in c.events(id)`)."""
        return self._follow(job_id, last_event_id, None)

    async def _follow(self, job_id: str, last_event_id: str | None, deadline: float | None
                      ) -> AsyncIterator[Event]:
        drops, retry_s = 0, DEFAULT_RETRY_S
        while True:
            parser = SSEParser()
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                async with self._http.stream(
                        "GET", f"/v1/jobs/{job_id}/events", headers=headers,
                        timeout=_stream_timeout(self._http.timeout, deadline)) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        _raise_for(r)
                    async for line in r.aiter_lines():
                        _check_deadline(deadline, job_id)
                        event = parser.feed(line)
                        if event is None:
                            continue
                        drops, last_event_id = 0, event.id or last_event_id
                        yield event
                        if event.type in TERMINAL:
                            return
            except httpx.TransportError:
                _check_deadline(deadline, job_id)
                drops += 1
                if drops > RECONNECTS:
                    raise
            else:
                if (await self.get(job_id)).done:
                    return
                drops += 1
                if drops > RECONNECTS:
                    raise ConnectionError(f"the event stream of job {job_id} keeps closing "
                                          "before the job's end")
            if parser.retry_ms is not None:
                retry_s = parser.retry_ms / 1000
            await asyncio.sleep(_reconnect_delay(drops, retry_s, deadline))

    async def wait(self, job_id: str, on_progress: ProgressCallback | None = None,
                   timeout: float | None = None, poll_s: float = 1.0) -> Job:
        """See `Client.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        report = _ProgressReporter(on_progress)
        try:
            async for event in self._follow(job_id, None, deadline):
                if (done := report.event(event)) is not None:
                    return done
        except (httpx.TransportError, ConnectionError, MagicFaceError) as e:
            if not _may_poll(e):
                raise
        while (done := report.polled(await self.get(job_id))) is None:
            await asyncio.sleep(_poll_delay(deadline, job_id, poll_s))
        return done

    async def download(self, job_id: str, path: str | Path | None = None,
                       what: str = "image") -> bytes:
        """See `Client.download`."""
        _check_what(what)
        r = await self._http.get(f"/v1/jobs/{job_id}/{what}")
        if r.is_redirect:
            url, same = _redirect_target(r, self._http.base_url)
            if same:
                r = await self._http.get(url)
            else:
                async with httpx.AsyncClient(timeout=self._http.timeout,
                                             follow_redirects=True) as plain:
                    r = await plain.get(url)
        _raise_for(r)
        return _save(r.content, path)

    async def run(self, prompt: str, concepts: Sequence[Concept],
                  path: str | Path | None = None, *,
                  on_progress: ProgressCallback | None = None, timeout: float | None = None,
                  **submit_kw: Any) -> bytes:
        """See `Client.run`."""
        job = await self.submit(prompt, concepts, **submit_kw)
        if job.done:
            _finished(job.raw)
        else:
            await self.wait(job.id, on_progress=on_progress, timeout=timeout)
        return await self.download(job.id, path)
