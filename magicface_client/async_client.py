"""`AsyncClient`: the methods of `Client` as coroutines, for asyncio programs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from .downloads import check_what, redirect_target, save
from .following import (
    DEFAULT_RETRY_S,
    RECONNECTS,
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
from .transport import default_headers, list_params, raise_for

__all__ = ["AsyncClient"]


class AsyncClient:
    """The asyncio client: the methods of `Client`, as coroutines (`list` and `events`
    are async iterators). Use `async with AsyncClient(...) as c`, or `aclose()`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 **httpx_kwargs: Any):
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                       headers=default_headers(api_key), **httpx_kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        r = await self._http.request(method, url, **kw)
        raise_for(r)
        return r

    async def submit(self, prompt: str, concepts: Sequence[Concept], *,
                     params: dict | None = None, webhook: str | None = None,
                     webhook_events: Sequence[str] | None = None,
                     idempotency_key: str | None = None, wait: int | None = None,
                     cancel_after: str | float | None = None, json_body: bool = False) -> Job:
        """See `Client.submit`."""
        kw = submission(prompt, concepts, params=params, webhook=webhook,
                         webhook_events=webhook_events, idempotency_key=idempotency_key,
                         wait=wait, cancel_after=cancel_after, json_body=json_body)
        r = await self._call("POST", "/v1/jobs",
                             timeout=held_timeout(self._http.timeout, wait), **kw)
        return Job.from_view(r.json())

    async def get(self, job_id: str) -> Job:
        """See `Client.get`."""
        return Job.from_view((await self._call("GET", f"/v1/jobs/{job_id}")).json())

    async def list(self, status: str | None = None, limit: int = 20) -> AsyncIterator[Job]:
        """See `Client.list` (`async for job in c.list()`)."""
        cursor = None
        while True:
            r = await self._call("GET", "/v1/jobs", params=list_params(status, limit, cursor))
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
                        timeout=stream_timeout(self._http.timeout, deadline)) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise_for(r)
                    async for line in r.aiter_lines():
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
                if (await self.get(job_id)).done:
                    return
                drops += 1
                if drops > RECONNECTS:
                    raise ConnectionError(f"the event stream of job {job_id} keeps closing "
                                          "before the job's end")
            if parser.retry_ms is not None:
                retry_s = parser.retry_ms / 1000
            await asyncio.sleep(reconnect_delay(drops, retry_s, deadline))

    async def wait(self, job_id: str, on_progress: ProgressCallback | None = None,
                   timeout: float | None = None, poll_s: float = 1.0) -> Job:
        """See `Client.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        report = ProgressReporter(on_progress)
        try:
            async for event in self._follow(job_id, None, deadline):
                if (done := report.event(event)) is not None:
                    return done
        except (httpx.TransportError, ConnectionError, MagicFaceError) as e:
            if not may_poll(e):
                raise
        while (done := report.polled(await self.get(job_id))) is None:
            await asyncio.sleep(poll_delay(deadline, job_id, poll_s))
        return done

    async def download(self, job_id: str, path: str | Path | None = None,
                       what: str = "image") -> bytes:
        """See `Client.download`."""
        check_what(what)
        r = await self._http.get(f"/v1/jobs/{job_id}/{what}")
        if r.is_redirect:
            url, same = redirect_target(r, self._http.base_url)
            if same:
                r = await self._http.get(url)
            else:
                async with httpx.AsyncClient(timeout=self._http.timeout,
                                             follow_redirects=True) as plain:
                    r = await plain.get(url)
        raise_for(r)
        return save(r.content, path)

    async def run(self, prompt: str, concepts: Sequence[Concept],
                  path: str | Path | None = None, *,
                  on_progress: ProgressCallback | None = None, timeout: float | None = None,
                  **submit_kw: Any) -> bytes:
        """See `Client.run`."""
        job = await self.submit(prompt, concepts, **submit_kw)
        if job.done:
            finished(job.raw)
        else:
            await self.wait(job.id, on_progress=on_progress, timeout=timeout)
        return await self.download(job.id, path)
