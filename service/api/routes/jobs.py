"""/v1/jobs: submit (multipart or JSON), list, read, follow (SSE), cancel, delete,
download, and the webhook delivery log. Each route parses, calls one function of
`service.jobs` and shapes the response."""

from __future__ import annotations

import logging
import os
import re
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from ... import jobs
from ...errors import ApiError
from ...jobs import events
from ...schemas import JobList, JobState, JobView, WebhookDeliveries, WebhookDelivery
from ...settings import Settings
from ...storage import StorageError
from ...submission import (
    from_json,
    from_multipart,
    parse_cancel_after,
    parse_json_body,
    parse_prefer_wait,
)
from .. import openapi
from ..deps import OwnerDep, QueueDep, RedisDep, SettingsDep, StorageDep, current_owner
from ..request_ids import request_id

log = logging.getLogger("magicface.gateway")

# The HTTP status of each job-level refusal (service.jobs raises them).
JOB_ERROR_STATUS = {jobs.JobNotFound: 404, jobs.JobFinished: 409,
                    jobs.IdempotencyConflict: 422, jobs.InvalidCursor: 422}
EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")

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


async def _submission(request: Request, settings: Settings):
    """A function making the submission from the body: multipart is read here, JSON
    is parsed here but made in a thread (it may fetch image URLs)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        sub = await from_multipart(request, settings)
        return lambda: sub
    if ctype == "application/json":
        body = parse_json_body(await request.body())
        return lambda: from_json(body, settings)
    raise ApiError(415, "unsupported_media_type",
                   "Content-Type: use multipart/form-data or application/json")


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
    wait, lifetime = parse_prefer_wait(prefer, settings), parse_cancel_after(cancel_after)
    await _thread(request, lambda: jobs.submit.check_queue_room(redis, queue, settings, owner))
    make, rid = await _submission(request, settings), request_id(request)
    view = await _thread(request, lambda: jobs.create(
        make(), owner, settings, redis, queue, storage, rid, lifetime, idempotency_key))
    release = request.scope.get("state", {}).get("release_upload_slot")
    if release is not None:  # waiting must not hold a slot other uploads need
        release()
    if wait and not view.status.terminal and await events.wait_for_end(
            _aredis(request), view.id, wait):
        view = await _thread(request, lambda: jobs.describe(
            jobs.fetch(redis, view.id, owner), queue))
    headers = {"Preference-Applied": f"wait={wait}"} if wait is not None else {}
    return _view_response(view, 201 if view.status.terminal else 202, headers)


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
def delete_job(job_id: str, redis: RedisDep, owner: OwnerDep, storage: StorageDep) -> Response:
    if jobs.delete(redis, jobs.fetch(redis, job_id, owner), owner):
        # The record is gone; a storage failure leaves the objects to the sweeper.
        jobs.lifecycle.remove_objects(storage, job_id, "deleted")
    return Response(status_code=204)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, operation_id="cancel_job",
             summary="Cancel a job (queued: canceled at once; running: cancel_requested, "
                     "then canceled at its next step)", responses=openapi.errors(404, 409))
def cancel_job(job_id: str, redis: RedisDep, queue: QueueDep, owner: OwnerDep,
               settings: SettingsDep, storage: StorageDep) -> JobView:
    job = jobs.fetch(redis, job_id, owner)
    if jobs.cancel(redis, job, settings.result_ttl_s, queue) and not settings.keep_inputs:
        try:  # it will never run: its uploads go now (the sweeper takes any left)
            jobs.lifecycle.drop_inputs(storage, job_id)
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

    def reconcile():
        return _thread(request, lambda: jobs.reconcile(redis, queue, job_id,
                                                       settings.result_ttl_s))

    stream = events.follow(_aredis(request), job_id, (last_event_id or "0-0").strip(),
                           reconcile)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})


@router.get("/jobs/{job_id}/webhook_deliveries", response_model=WebhookDeliveries,
            operation_id="list_webhook_deliveries", responses=openapi.errors(404),
            summary="The job's webhook deliveries, oldest first")
def webhook_deliveries(job_id: str, redis: RedisDep, owner: OwnerDep) -> WebhookDeliveries:
    jobs.fetch(redis, job_id, owner)
    return WebhookDeliveries(deliveries=jobs.deliveries.deliveries(redis, job_id))


@router.post("/jobs/{job_id}/webhook_deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=WebhookDelivery, operation_id="redeliver_webhook",
             responses=openapi.errors(404), summary="Send a delivery again (same webhook-id)")
def redeliver(job_id: str, delivery_id: str, redis: RedisDep, owner: OwnerDep
              ) -> WebhookDelivery:
    jobs.fetch(redis, job_id, owner)
    return jobs.deliveries.redeliver(redis, job_id, delivery_id)


def _download(job_id: str, name: str, request: Request, redis, queue, storage,
              settings: Settings, owner: str) -> Response:
    # The owner check comes first: a presigned URL goes only to the job's owner.
    view = jobs.describe(jobs.fetch(redis, job_id, owner), queue)
    out = jobs.outputs.output(view, name, storage, settings.presign_expires_s,
                              request_id(request))
    if out.url:
        return RedirectResponse(out.url, status_code=307)
    return StreamingResponse(out.body, media_type="image/png")


@router.get("/jobs/{job_id}/image", response_class=Response, operation_id="get_image",
            responses={**openapi.PNG, **openapi.errors(404, 409, 410, 503)},
            summary="The generated image")
def get_image(job_id: str, request: Request, redis: RedisDep, queue: QueueDep,
              storage: StorageDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return _download(job_id, "image", request, redis, queue, storage, settings, owner)


@router.get("/jobs/{job_id}/semantic_map", response_class=Response,
            operation_id="get_semantic_map",
            responses={**openapi.PNG, **openapi.errors(404, 409, 410, 503)},
            summary="The final semantic map over the image")
def get_semantic_map(job_id: str, request: Request, redis: RedisDep, queue: QueueDep,
                     storage: StorageDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return _download(job_id, "semantic_map", request, redis, queue, storage, settings,
                     owner)
