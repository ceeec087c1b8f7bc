"""`Client` and `AsyncClient`: submit, follow (server-sent events, polling as a
fallback), cancel, delete, list and download jobs. The request building is shared; the
two classes differ only in how they wait for the network."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .models import Concept, Job, JobFailed, MagicFaceError, image_bytes
from .sse import Event, aparse_lines, parse_lines

__all__ = ["Client", "AsyncClient"]

ProgressCallback = Callable[[dict], None]
RECONNECTS = 5  # a dropped event stream is resumed this many times in a row


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _submission(prompt: str, concepts: Sequence[Concept], *, params: dict | None,
                webhook: str | None, webhook_events: Sequence[str] | None,
                idempotency_key: str | None, wait: int | None, cancel_after: str | float | None,
                json_body: bool) -> dict[str, Any]:
    """httpx keyword arguments of POST /v1/jobs."""
    headers: dict[str, str] = {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if wait is not None:
        headers["Prefer"] = f"wait={int(wait)}"
    if cancel_after is not None:
        headers["Cancel-After"] = str(cancel_after)
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
    files = [("images", (f"image{i}.png", image_bytes(c.image))) for i, c in enumerate(concepts)]
    if any(c.mask is not None for c in concepts):
        files += [("masks", (f"mask{i}.png", image_bytes(c.mask)))
                  for i, c in enumerate(concepts)]
    return {"data": data, "files": files, "headers": headers}


def _page(status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    """The query of one page of GET /v1/jobs."""
    q: dict[str, Any] = {"limit": limit}
    if status:
        q["status"] = status
    if cursor:
        q["cursor"] = cursor
    return q


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", r.text[:200]
    retry = r.headers.get("Retry-After")
    raise MagicFaceError(r.status_code, code, message,
                         float(retry) if retry and retry.isdigit() else None)


def _finished(view: dict) -> Job:
    job = Job.from_view(view)
    if job.status != "succeeded":
        raise JobFailed(job)
    return job


def _same_origin(a: httpx.URL, b: str) -> bool:
    u = urlsplit(b)
    return not u.netloc or (u.scheme, u.netloc) == (a.scheme, a.netloc.decode())


class Client:
    """The synchronous client. `base_url` like `http://localhost:8000`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 **httpx_kwargs: Any):
        self._http = httpx.Client(base_url=base_url, timeout=timeout,
                                  headers=_headers(api_key), **httpx_kwargs)

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
        """Queue a job (multipart, or JSON with data: URIs when `json_body`). With `wait`
        the service holds the answer up to that many seconds for the job to end."""
        kw = _submission(prompt, concepts, params=params, webhook=webhook,
                         webhook_events=webhook_events, idempotency_key=idempotency_key,
                         wait=wait, cancel_after=cancel_after, json_body=json_body)
        timeout = None if wait is None else self._http.timeout.read + wait
        return Job.from_view(self._call("POST", "/v1/jobs", timeout=timeout, **kw).json())

    def get(self, job_id: str) -> Job:
        return Job.from_view(self._call("GET", f"/v1/jobs/{job_id}").json())

    def list(self, status: str | None = None, limit: int = 20) -> Iterator[Job]:
        """Your jobs, newest first, every page."""
        cursor = None
        while True:
            page = self._call("GET", "/v1/jobs", params=_page(status, limit, cursor)).json()
            yield from (Job.from_view(v) for v in page["jobs"])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        return Job.from_view(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events from the start (or after `last_event_id`) until its end;
        a dropped connection is resumed where it broke."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                       timeout=httpx.Timeout(self._http.timeout.connect,
                                                             read=None)) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_for(r)
                    for event in parse_lines(r.iter_lines()):
                        failures = 0
                        last_event_id = event.id or last_event_id
                        yield event
                return  # the server ends the stream after the job's last event
            except httpx.TransportError:
                failures += 1
                if failures > RECONNECTS:
                    raise
                time.sleep(min(2.0, 0.2 * 2 ** failures))

    def wait(self, job_id: str, on_progress: ProgressCallback | None = None,
             timeout: float | None = None, poll_s: float = 1.0) -> Job:
        """The finished job; JobFailed if it failed, was canceled or expired;
        TimeoutError after `timeout` seconds. Follows the event stream, polling when it
        cannot be opened."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for event in self.events(job_id):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")
                if event.type == "progress" and on_progress:
                    on_progress(event.data)
                if event.type in ("succeeded", "failed", "canceled", "expired"):
                    return _finished(event.data)
        except (httpx.TransportError, MagicFaceError) as e:
            if isinstance(e, MagicFaceError) and e.status in (401, 404):
                raise
        while True:  # no stream: poll
            job = self.get(job_id)
            if job.done:
                return _finished(job.raw)
            if on_progress:
                on_progress(job.progress)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish in {timeout} s")
            time.sleep(poll_s)

    def download(self, job_id: str, path: str | Path | None = None,
                 what: str = "image") -> bytes:
        """The job's PNG (`what`: image or semantic_map), written to `path` when given.
        A redirect to presigned storage is followed without the API key."""
        r = self._http.get(f"/v1/jobs/{job_id}/{what}", follow_redirects=False)
        if r.is_redirect:
            location = r.headers["location"]
            if _same_origin(self._http.base_url, location):
                r = self._http.get(location)
            else:
                r = httpx.get(location, timeout=self._http.timeout)
        _raise_for(r)
        if path is not None:
            Path(path).write_bytes(r.content)
        return r.content

    def run(self, prompt: str, concepts: Sequence[Concept], path: str | Path | None = None,
            on_progress: ProgressCallback | None = None, **submit_kw: Any) -> bytes:
        """Submit, wait, download: the image's bytes."""
        job = self.submit(prompt, concepts, **submit_kw)
        self.wait(job.id, on_progress=on_progress)
        return self.download(job.id, path)


class AsyncClient:
    """The asyncio client, with the same methods as `Client` (awaitable)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 **httpx_kwargs: Any):
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                       headers=_headers(api_key), **httpx_kwargs)

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
        kw = _submission(prompt, concepts, params=params, webhook=webhook,
                         webhook_events=webhook_events, idempotency_key=idempotency_key,
                         wait=wait, cancel_after=cancel_after, json_body=json_body)
        timeout = None if wait is None else self._http.timeout.read + wait
        r = await self._call("POST", "/v1/jobs", timeout=timeout, **kw)
        return Job.from_view(r.json())

    async def get(self, job_id: str) -> Job:
        return Job.from_view((await self._call("GET", f"/v1/jobs/{job_id}")).json())

    async def list(self, status: str | None = None, limit: int = 20) -> AsyncIterator[Job]:
        cursor = None
        while True:
            page = (await self._call("GET", "/v1/jobs",
                                     params=_page(status, limit, cursor))).json()
            for v in page["jobs"]:
                yield Job.from_view(v)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def cancel(self, job_id: str) -> Job:
        return Job.from_view((await self._call("POST", f"/v1/jobs/{job_id}/cancel")).json())

    async def delete(self, job_id: str) -> None:
        await self._call("DELETE", f"/v1/jobs/{job_id}")

    async def events(self, job_id: str, last_event_id: str | None = None
                     ) -> AsyncIterator[Event]:
        import asyncio

        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                async with self._http.stream(
                        "GET", f"/v1/jobs/{job_id}/events", headers=headers,
                        timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        _raise_for(r)
                    async for event in aparse_lines(r.aiter_lines()):
                        failures = 0
                        last_event_id = event.id or last_event_id
                        yield event
                return
            except httpx.TransportError:
                failures += 1
                if failures > RECONNECTS:
                    raise
                await asyncio.sleep(min(2.0, 0.2 * 2 ** failures))

    async def wait(self, job_id: str, on_progress: ProgressCallback | None = None,
                   timeout: float | None = None) -> Job:
        import asyncio

        async def follow() -> Job:
            async for event in self.events(job_id):
                if event.type == "progress" and on_progress:
                    on_progress(event.data)
                if event.type in ("succeeded", "failed", "canceled", "expired"):
                    return _finished(event.data)
            return _finished((await self.get(job_id)).raw)

        try:
            return await asyncio.wait_for(follow(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {job_id} did not finish in {timeout} s") from None

    async def download(self, job_id: str, path: str | Path | None = None,
                       what: str = "image") -> bytes:
        r = await self._http.get(f"/v1/jobs/{job_id}/{what}", follow_redirects=False)
        if r.is_redirect:
            location = r.headers["location"]
            if _same_origin(self._http.base_url, location):
                r = await self._http.get(location)
            else:
                async with httpx.AsyncClient(timeout=self._http.timeout) as plain:
                    r = await plain.get(location)
        _raise_for(r)
        if path is not None:
            Path(path).write_bytes(r.content)
        return r.content
