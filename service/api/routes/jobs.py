"""/v1/jobs: submit (multipart or JSON), list, read, follow (SSE), cancel, delete,
download, and the webhook delivery log."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from ... import events, fairness, jobs
from ...errors import ApiError
from ...keys import CANCEL_KEY, WEBHOOK_DUE_KEY, WEBHOOK_LOG_KEY
from ...schemas import (
    TERMINAL_EVENTS,
    JobList,
    JobState,
    JobView,
    WebhookDeliveries,
    WebhookDelivery,
)
from ...settings import Settings
from ...storage import Storage, StorageError, input_key, output_key, request_key
from ...submission import (
    Submission,
    from_json,
    from_multipart,
    parse_cancel_after,
    parse_json_body,
    parse_prefer_wait,
)
from ...validation import body_hash, validate_request
from .. import openapi
from ..deps import OwnerDep, QueueDep, RedisDep, SettingsDep, StorageDep, current_owner
from ..request_ids import request_id

log = logging.getLogger("magicface.gateway")
audit = logging.getLogger("magicface.audit")

# The HTTP status of each job-level refusal (service.jobs raises them).
JOB_ERROR_STATUS = {jobs.JobNotFound: 404, jobs.JobFinished: 409,
                    jobs.IdempotencyConflict: 422, jobs.InvalidCursor: 422}
EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
# How long one blocking read of a job's events waits before the stream checks the job
# (and sends a keep-alive comment).
SSE_POLL_S = 10.0

router = APIRouter(prefix="/v1", dependencies=[Depends(current_owner)],
                   responses=openapi.errors(401))


def _thread(request: Request, fn):
    """Blocking work (Redis, storage, image decoding) off the event loop, a few at a
    time (more threads than cores only fight the loop for the GIL)."""
    state = request.app.state
    if getattr(state, "create_limiter", None) is None:
        state.create_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    return anyio.to_thread.run_sync(fn, limiter=state.create_limiter)


def _aredis(request: Request):
    """The app's async Redis (made by the lifespan; made here when an ASGI host ran
    none)."""
    state = request.app.state
    if getattr(state, "aredis", None) is None:
        from redis.asyncio import Redis as AsyncRedis

        state.aredis = AsyncRedis.from_url(state.settings.redis_url, socket_timeout=60)
    return state.aredis


def _view_response(view: JobView, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(view.model_dump(mode="json"), status_code=status,
                        headers={"Location": f"/v1/jobs/{view.id}", **(headers or {})})


@router.post("/jobs", status_code=202, response_model=JobView, operation_id="create_job",
             summary="Submit a generation job (multipart with files, or JSON)",
             openapi_extra=openapi.CREATE_JOB_BODY,
             responses={**openapi.CREATED, **openapi.errors(413, 415, 422, 429, 503)})
async def create_job(
    request: Request, settings: SettingsDep, redis: RedisDep, queue: QueueDep,
    storage: StorageDep, owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", max_length=200,
        description="the same key and body within 24 h return the same job")] = None,
    prefer: Annotated[str | None, Header(
        description="`wait=N` (N <= 60): answer 201 with the finished job if it ends "
                    "within N seconds, else the usual 202")] = None,
    cancel_after: Annotated[str | None, Header(
        alias="Cancel-After", description="a deadline from submission: seconds (`90`) or "
                                          "`1h30m`/`5m`/`45s`; unfinished by then, the "
                                          "job expires")] = None,
) -> JSONResponse:
    wait = parse_prefer_wait(prefer, settings)
    lifetime = parse_cancel_after(cancel_after)
    await _thread(request, lambda: _check_queue_room(redis, queue, settings, owner))
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        sub = await from_multipart(request, settings)
        make = lambda: sub  # noqa: E731
    elif ctype == "application/json":
        body = parse_json_body(await request.body())
        make = lambda: from_json(body, settings)  # noqa: E731 - fetches URLs: a thread
    else:
        raise ApiError(415, "unsupported_media_type",
                       "Content-Type: use multipart/form-data or application/json")
    rid = request_id(request)
    view = await _thread(request, lambda: _create(make(), owner, settings, redis, queue,
                                                  storage, rid, lifetime, idempotency_key))
    release = request.scope.get("state", {}).get("release_upload_slot")
    if release is not None:  # waiting must not hold a slot other uploads need
        release()
    if wait and not view.status.terminal:
        if await _wait_for_end(request, view.id, wait):
            view = await _thread(request, lambda: jobs.describe(
                jobs.fetch(redis, view.id, owner), queue))
    headers = {"Preference-Applied": f"wait={wait}"} if wait is not None else {}
    return _view_response(view, 201 if view.status.terminal else 202, headers)


def _check_queue_room(redis: Redis, queue: Queue, settings: Settings, owner: str) -> None:
    """429 when the queue holds MAX_QUEUED jobs, or this key MAX_QUEUED_PER_KEY (that
    key's alone: the others still submit)."""
    queued = queue.count
    if queued >= settings.max_queued:
        raise ApiError(429, "queue_full", f"the queue holds {queued} jobs (at most "
                                          f"{settings.max_queued}); retry later",
                       headers={"Retry-After": _retry_after(redis, queue,
                                                            queued - settings.max_queued)})
    mine = fairness.queued_for(redis, queue, owner)
    if mine >= settings.max_queued_per_key:
        raise ApiError(429, "key_queue_full",
                       f"this API key has {mine} jobs queued (at most "
                       f"{settings.max_queued_per_key}, MAX_QUEUED_PER_KEY); retry later",
                       headers={"Retry-After": _retry_after(
                           redis, queue, mine - settings.max_queued_per_key)})


def _retry_after(redis: Redis, queue: Queue, over: int) -> str:
    mean = jobs.mean_duration(redis)
    workers = max(1, len(jobs.live_workers(redis, queue.name)))
    return str(30 if mean is None else max(1, int(mean * (over + 1) / workers)))


async def _wait_for_end(request: Request, job_id: str, seconds: int) -> bool:
    """Whether the job's terminal event arrives within `seconds`."""
    aredis = _aredis(request)
    deadline = time.monotonic() + seconds
    last = "0-0"
    while (left := deadline - time.monotonic()) > 0:
        got = await aredis.xread({events.events_key(job_id): last}, count=100,
                                 block=max(1, int(min(left, SSE_POLL_S) * 1000)))
        for eid, fields in (got[0][1] if got else []):
            last = eid
            if fields[b"type"].decode() in {e.value for e in TERMINAL_EVENTS}:
                return True
    return False


def _create(sub: Submission, owner: str, settings: Settings, redis: Redis, queue: Queue,
            storage: Storage, rid: str, lifetime: float | None, key: str | None) -> JobView:
    req = validate_request(sub.prompt, sub.concepts, sub.images, sub.masks, sub.params,
                           settings)
    hook = ([sub.webhook, sorted(e.value for e in sub.webhook_events)] if sub.webhook
            else None)
    digest = body_hash(req, json.dumps([hook, lifetime]))
    if key and (existing := jobs.lookup_idempotency(redis, owner, key, digest)):
        return jobs.describe(jobs.fetch(redis, existing, owner), queue)
    job_id = jobs.new_job_id()
    now = time.time()
    hashes = [hashlib.sha256(u.data).hexdigest() for u in req.images + req.masks]
    try:
        storage.put(request_key(job_id), json.dumps(req.record()).encode(), "application/json")
        for i, img in enumerate(req.images):
            storage.put(input_key(job_id, "image", i), img.data, img.content_type)
        for i, m in enumerate(req.masks):
            storage.put(input_key(job_id, "mask", i), m.data, m.content_type)
        job = jobs.enqueue(
            queue, job_id, req.params.steps, settings.job_timeout_s, settings.result_ttl_s,
            owner, deadline=None if lifetime is None else now + lifetime,
            queue_deadline=now + settings.queue_ttl_s,
            webhook=jobs.Webhook(sub.webhook, sub.webhook_events) if sub.webhook else None,
            legend=jobs.legend([c.word for c in req.concepts]), inputs_sha256=hashes,
            batch_key=req.batch_key())
    except (StorageError, RedisError) as e:
        log.warning("request %s: job %s not created: %s", rid, job_id, e)
        _discard(storage, redis, job_id)
        raise ApiError(503, "unavailable", "the job could not be stored or queued "
                                           f"(request {rid})") from None
    if key:
        # The key points only at a stored, enqueued job: set it now. A racing request
        # with the same key may have won; then ours is dropped and theirs returned.
        ttl = min(settings.idempotency_ttl_s, settings.result_ttl_s)
        try:
            winner = jobs.remember_idempotency(redis, owner, key, job_id, digest, ttl)
        except jobs.IdempotencyConflict:
            _discard(storage, redis, job_id, job)
            raise
        if winner != job_id:
            _discard(storage, redis, job_id, job)
            return jobs.describe(jobs.fetch(redis, winner, owner), queue)
    audit.info("job=%s owner=%s request=%s inputs=%s prompt=%r", job_id, owner, rid,
               ",".join(h[:16] for h in hashes), req.prompt)
    return jobs.describe(job, queue)


def _discard(storage: Storage, redis: Redis, job_id: str, job=None) -> None:
    """Remove a job that will not run: its queue entry and record (and a flag in case
    a worker took it already) and its objects."""
    if job is not None:
        try:
            redis.set(CANCEL_KEY.format(job_id), JobState.CANCELED.value, ex=3600)
            jobs.purge(redis, job)
        except RedisError:
            pass
    try:
        storage.delete_prefix(f"jobs/{job_id}/")
    except StorageError:
        pass


@router.get("/jobs", response_model=JobList, operation_id="list_jobs",
            summary="Your jobs, newest first", responses=openapi.errors(422))
def list_jobs(redis: RedisDep, queue: QueueDep, owner: OwnerDep,
              status: Annotated[JobState | None, Query(description="only jobs in this "
                                                                   "state")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              cursor: Annotated[str | None, Query(max_length=40, description="the "
                                                  "previous page's next_cursor")] = None
              ) -> JobList:
    views, next_cursor = jobs.list_jobs(redis, queue, owner, limit=limit, cursor=cursor,
                                        status=status)
    return JobList(jobs=views, next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobView, operation_id="get_job",
            summary="Job status and result", responses=openapi.errors(404))
def get_job(job_id: str, redis: RedisDep, queue: QueueDep, owner: OwnerDep,
            settings: SettingsDep) -> JobView:
    job = jobs.fetch(redis, job_id, owner)
    jobs.expire_if_due(redis, job, queue, settings.result_ttl_s)
    return jobs.describe(job, queue)


@router.delete("/jobs/{job_id}", status_code=204, response_class=Response,
               operation_id="delete_job", responses=openapi.errors(404),
               summary="Delete a job: cancel it if needed, remove its inputs, outputs "
                       "and record")
def delete_job(job_id: str, redis: RedisDep, owner: OwnerDep, storage: StorageDep,
               request: Request) -> Response:
    job = jobs.fetch(redis, job_id, owner)
    if jobs.delete(redis, job, owner):
        try:
            storage.delete_prefix(f"jobs/{job_id}/")
        except StorageError as e:  # the record is gone; the sweeper takes the objects
            log.warning("request %s: objects of deleted job %s left to the sweeper: %s",
                        request_id(request), job_id, e)
    return Response(status_code=204)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, operation_id="cancel_job",
             summary="Cancel a job (queued: canceled at once; running: cancel_requested, "
                     "then canceled at its next step)", responses=openapi.errors(404, 409))
def cancel_job(job_id: str, redis: RedisDep, queue: QueueDep, owner: OwnerDep,
               settings: SettingsDep, storage: StorageDep) -> JobView:
    job = jobs.fetch(redis, job_id, owner)
    if jobs.cancel(redis, job, settings.result_ttl_s, queue) and not settings.keep_inputs:
        try:  # it will never run: its uploads go now (the sweeper takes any left)
            storage.delete_prefix(f"jobs/{job_id}/input/")
            storage.delete(request_key(job_id))
        except StorageError as e:
            log.warning("job %s: inputs of a canceled job not deleted: %s", job_id, e)
    return jobs.describe(job, queue)


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            operation_id="job_events", responses={**openapi.SSE, **openapi.errors(404, 422)},
            summary="The job's events as server-sent events (resumable with Last-Event-ID)")
async def job_events(
    job_id: str, request: Request, redis: RedisDep, queue: QueueDep, owner: OwnerDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", description="resume after this event id")] = None,
) -> StreamingResponse:
    if last_event_id is not None and not EVENT_ID.fullmatch(last_event_id.strip()):
        raise ApiError(422, "invalid_header", "Last-Event-ID: not an event id of this API")
    await _thread(request, lambda: jobs.fetch(redis, job_id, owner))
    aredis = _aredis(request)
    key = events.events_key(job_id)
    terminal = {e.value for e in TERMINAL_EVENTS}

    async def stream():
        yield "retry: 2000\n\n"
        last = (last_event_id or "0-0").strip()
        while True:
            got = await aredis.xread({key: last}, count=100, block=int(SSE_POLL_S * 1000))
            rows = got[0][1] if got else []
            for eid, fields in rows:
                last = eid.decode()
                kind = fields[b"type"].decode()
                yield f"id: {last}\nevent: {kind}\ndata: {fields[b'data'].decode()}\n\n"
                if kind in terminal:
                    return
            if rows:
                continue
            # Nothing new: the job may have ended without its event (its worker died
            # before RQ noticed), its end may lie before `last` (a resume after the
            # end), or its record may be gone (expired, deleted).
            state = await _thread(request, lambda: _reconcile(redis, queue, job_id,
                                                              settings.result_ttl_s))
            if state == "gone":
                return
            if state == "ended" and not await aredis.xread({key: last}, count=1):
                return
            yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})


def _reconcile(redis: Redis, queue: Queue, job_id: str, record_ttl_s: int) -> str:
    """"gone" (no such job any more), "ended" (its terminal event is in the log, now
    at the latest) or "live"."""
    try:
        job = jobs.fetch(redis, job_id)
    except jobs.JobNotFound:
        return "gone"
    jobs.expire_if_due(redis, job, queue, record_ttl_s)
    if events.has_terminal(redis, job_id) or jobs.publish_end(redis, job, queue,
                                                              record_ttl_s):
        return "ended"
    return "live"


@router.get("/jobs/{job_id}/webhook_deliveries", response_model=WebhookDeliveries,
            operation_id="list_webhook_deliveries", responses=openapi.errors(404),
            summary="The job's webhook deliveries, oldest first")
def webhook_deliveries(job_id: str, redis: RedisDep, owner: OwnerDep) -> WebhookDeliveries:
    jobs.fetch(redis, job_id, owner)
    raw = redis.hgetall(WEBHOOK_LOG_KEY.format(job_id))
    records = sorted((json.loads(v) for v in raw.values()),
                     key=lambda r: tuple(int(x) for x in r["event_id"].split("-")))
    return WebhookDeliveries(deliveries=[WebhookDelivery(**r) for r in records])


@router.post("/jobs/{job_id}/webhook_deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=WebhookDelivery, operation_id="redeliver_webhook",
             responses=openapi.errors(404), summary="Send a delivery again (same webhook-id)")
def redeliver(job_id: str, delivery_id: str, redis: RedisDep, owner: OwnerDep
              ) -> WebhookDelivery:
    jobs.fetch(redis, job_id, owner)
    log_key = WEBHOOK_LOG_KEY.format(job_id)
    raw = redis.hget(log_key, delivery_id[:200])
    if raw is None:
        raise ApiError(404, "not_found", f"job {job_id} has no delivery {delivery_id[:80]!r}")
    rec = json.loads(raw)
    rec.update(status="pending", next_attempt_at=time.time(), redelivery=True,
               first_attempt_at=None)
    redis.hset(log_key, delivery_id, json.dumps(rec))
    redis.zadd(WEBHOOK_DUE_KEY, {f"{job_id}|{rec['event_id']}": time.time() * 1000})
    return WebhookDelivery(**rec)


def _download(job_id: str, name: str, redis: Redis, queue: Queue, storage: Storage,
              settings: Settings, owner: str, rid: str) -> Response:
    # The owner check comes first: a presigned URL goes only to the job's owner.
    view = jobs.describe(jobs.fetch(redis, job_id, owner), queue)
    if view.status in (JobState.FAILED, JobState.CANCELED, JobState.EXPIRED):
        err = view.error
        raise ApiError(410, err.code if err else view.status.value,
                       f"job {job_id} is {view.status.value}"
                       + (f": {err.message}" if err else ""))
    if view.status != JobState.SUCCEEDED:
        raise ApiError(409, "not_ready",
                       f"job {job_id} is {view.status.value}, not succeeded")
    key = output_key(job_id, name)
    url = storage.presign(key, settings.presign_expires_s)
    if url:
        return RedirectResponse(url, status_code=307)
    try:
        if not storage.exists(key):
            raise ApiError(404, "not_found", f"job {job_id} has no {name.replace('_', ' ')}")
        body = storage.stream(key)
    except StorageError as e:
        log.warning("request %s: download of %s failed: %s", rid, key, e)
        raise ApiError(503, "storage_unavailable",
                       f"storage is unavailable (request {rid})") from None
    return StreamingResponse(body, media_type="image/png")


@router.get("/jobs/{job_id}/image", response_class=Response, operation_id="get_image",
            responses={**openapi.PNG, **openapi.errors(404, 409, 410, 503)},
            summary="The generated image")
def get_image(job_id: str, request: Request, redis: RedisDep, queue: QueueDep,
              storage: StorageDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return _download(job_id, "image", redis, queue, storage, settings, owner,
                     request_id(request))


@router.get("/jobs/{job_id}/semantic_map", response_class=Response,
            operation_id="get_semantic_map",
            responses={**openapi.PNG, **openapi.errors(404, 409, 410, 503)},
            summary="The final semantic map over the image")
def get_semantic_map(job_id: str, request: Request, redis: RedisDep, queue: QueueDep,
                     storage: StorageDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return _download(job_id, "semantic_map", redis, queue, storage, settings, owner,
                     request_id(request))
