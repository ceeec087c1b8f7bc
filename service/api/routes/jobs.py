"""/v1/jobs: submit, read, cancel, download."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Form, Header, Request, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from ... import jobs
from ...errors import ApiError
from ...keys import CANCEL_KEY
from ...schemas import ErrorBody, JobState, JobView
from ...settings import Settings
from ...storage import Storage, StorageError, input_key, output_key, request_key
from ...validation import Upload, body_hash, validate_request
from ..deps import OwnerDep, QueueDep, RedisDep, SettingsDep, StorageDep, current_owner
from ..request_ids import request_id

log = logging.getLogger("magicface.gateway")

ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)}
# The HTTP status of each job-level refusal (service.jobs raises them).
JOB_ERROR_STATUS = {jobs.JobNotFound: 404, jobs.JobFinished: 409,
                    jobs.IdempotencyConflict: 422}

router = APIRouter(prefix="/v1", dependencies=[Depends(current_owner)], responses=ERRORS)
audit = logging.getLogger("magicface.audit")


async def _read(files: list[UploadFile] | None, limit: int) -> list[Upload]:
    out = []
    for f in files or []:
        data = await f.read(limit + 1)  # one byte over the limit is enough to refuse it
        out.append(Upload(f.filename, data))
    return out


def _accepted(view: JobView) -> JSONResponse:
    return JSONResponse(view.model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/jobs/{view.id}"})


@router.post("/jobs", status_code=202, response_model=JobView,
             summary="Submit a generation job")
async def create_job(
    request: Request, settings: SettingsDep, redis: RedisDep, queue: QueueDep,
    storage: StorageDep, owner: OwnerDep,
    prompt: Annotated[str, Form(description="the target prompt")],
    concepts: Annotated[str, Form(description='JSON list, one object per image: '
                                              '{"word", "weight", "reference_prompt"}')],
    images: Annotated[list[UploadFile], File(description="one reference image per concept")],
    masks: Annotated[list[UploadFile] | None, File(
        description="none, or one mask per concept (white = concept)")] = None,
    params: Annotated[str | None, Form(
        description="JSON: steps, guidance_scale, alpha, seed, negative_prompt, width, "
                    "height, preset ('authors' (default): the authors' code, which made "
                    "the published images; 'paper': the equations alone), ca_scale")] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key",
                                                  max_length=200)] = None,
) -> JSONResponse:
    image_up = await _read(images, settings.max_image_bytes)
    mask_up = await _read(masks, settings.max_image_bytes)
    form = SubmittedForm(prompt, concepts, image_up, mask_up, params, idempotency_key)
    # Decoding images and talking to storage and Redis block: off the event loop, and
    # a few at a time (more threads than cores only fight the event loop for the GIL).
    view = await anyio.to_thread.run_sync(
        lambda: _create(form, owner, settings, redis, queue, storage, request_id(request)),
        limiter=_limiter(request))
    return _accepted(view)


def _limiter(request: Request) -> anyio.CapacityLimiter:
    state = request.app.state
    if getattr(state, "create_limiter", None) is None:
        state.create_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    return state.create_limiter


@dataclass
class SubmittedForm:
    prompt: str
    concepts: str
    images: list[Upload]
    masks: list[Upload]
    params: str | None
    idempotency_key: str | None


def _create(form: SubmittedForm, owner: str, settings: Settings, redis: Redis, queue: Queue,
            storage: Storage, rid: str) -> JobView:
    req = validate_request(form.prompt, form.concepts, form.images, form.masks, form.params,
                           settings)
    key = form.idempotency_key
    digest = body_hash(form.prompt, form.concepts, form.images, form.masks, form.params)
    if key and (existing := jobs.lookup_idempotency(redis, owner, key, digest)):
        return jobs.describe(jobs.fetch(redis, existing, owner), queue)
    job_id = jobs.new_job_id()
    try:
        storage.put(request_key(job_id), json.dumps(req.record()).encode(), "application/json")
        for i, img in enumerate(req.images):
            storage.put(input_key(job_id, "image", i), img.data, img.content_type)
        for i, m in enumerate(req.masks):
            storage.put(input_key(job_id, "mask", i), m.data, m.content_type)
        job = jobs.enqueue(queue, job_id, req.params.steps, settings.job_timeout_s,
                           settings.result_ttl_s, owner)
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
               ",".join(hashlib.sha256(u.data).hexdigest()[:16] for u in req.images + req.masks),
               req.prompt)
    return jobs.describe(job, queue)


def _discard(storage: Storage, redis: Redis, job_id: str, job=None) -> None:
    """Remove a job that will not run: its queue entry (and a flag in case a worker
    took it already) and its objects."""
    if job is not None:
        try:
            redis.set(CANCEL_KEY.format(job_id), "1", ex=3600)
            job.delete(remove_from_queue=True)
        except RedisError:
            pass
    try:
        storage.delete_prefix(f"jobs/{job_id}/")
    except StorageError:
        pass


@router.get("/jobs/{job_id}", response_model=JobView, summary="Job status and result")
def get_job(job_id: str, redis: RedisDep, queue: QueueDep, owner: OwnerDep) -> JobView:
    return jobs.describe(jobs.fetch(redis, job_id, owner), queue)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, summary="Cancel a job")
def cancel_job(job_id: str, redis: RedisDep, queue: QueueDep, owner: OwnerDep,
               settings: SettingsDep, storage: StorageDep) -> JobView:
    job = jobs.fetch(redis, job_id, owner)
    if jobs.cancel(redis, job, settings.result_ttl_s) and not settings.keep_inputs:
        try:  # it will never run: its uploads go now (the sweeper takes any left)
            storage.delete_prefix(f"jobs/{job_id}/input/")
            storage.delete(request_key(job_id))
        except StorageError as e:
            log.warning("job %s: inputs of a canceled job not deleted: %s", job_id, e)
    return jobs.describe(job, queue)


def _download(job_id: str, name: str, redis: Redis, queue: Queue, storage: Storage,
              settings: Settings, owner: str, rid: str) -> Response:
    # The owner check comes first: a presigned URL goes only to the job's owner.
    view = jobs.describe(jobs.fetch(redis, job_id, owner), queue)
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


PNG = {200: {"content": {"image/png": {}}, "description": "the PNG"},
       307: {"description": "redirect to a presigned storage URL"}}


@router.get("/jobs/{job_id}/image", response_class=Response, responses=PNG,
            summary="The generated image")
def get_image(job_id: str, request: Request, redis: RedisDep, queue: QueueDep,
              storage: StorageDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return _download(job_id, "image", redis, queue, storage, settings, owner,
                     request_id(request))


@router.get("/jobs/{job_id}/semantic_map", response_class=Response, responses=PNG,
            summary="The final semantic map over the image")
def get_semantic_map(job_id: str, request: Request, redis: RedisDep, queue: QueueDep,
                     storage: StorageDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return _download(job_id, "semantic_map", redis, queue, storage, settings, owner,
                     request_id(request))
