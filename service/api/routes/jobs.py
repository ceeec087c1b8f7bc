"""/v1/jobs: submit, read, cancel, download."""

from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from ... import jobs
from ...errors import ApiError
from ...keys import IDEMPOTENCY_KEY
from ...schemas import ErrorBody, JobState, JobView
from ...settings import Settings
from ...storage import Storage, StorageError, input_key, output_key, request_key
from ...validation import Upload, body_hash, validate_request
from ..deps import QueueDep, RedisDep, SettingsDep, StorageDep, require_api_key

log = logging.getLogger("magicface.gateway")

ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)}
# The HTTP status of each job-level refusal (service.jobs raises them).
JOB_ERROR_STATUS = {jobs.JobNotFound: 404, jobs.JobFinished: 409,
                    jobs.IdempotencyConflict: 422}

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


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
    settings: SettingsDep, redis: RedisDep, queue: QueueDep, storage: StorageDep,
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
    req = validate_request(prompt, concepts, image_up, mask_up, params, settings)

    job_id = jobs.new_job_id()
    if idempotency_key:
        digest = body_hash(prompt, concepts, image_up, mask_up, params)
        owner = jobs.remember_idempotency(redis, idempotency_key, job_id, digest,
                                          settings.idempotency_ttl_s)
        if owner != job_id:
            return _accepted(jobs.describe(jobs.fetch(redis, owner), queue))
    try:
        storage.put(request_key(job_id), json.dumps(req.record()).encode(), "application/json")
        for i, img in enumerate(req.images):
            storage.put(input_key(job_id, "image", i), img.data, img.content_type)
        for i, m in enumerate(req.masks):
            storage.put(input_key(job_id, "mask", i), m.data, m.content_type)
        job = jobs.enqueue(queue, job_id, req.params.steps, settings.job_timeout_s,
                           settings.result_ttl_s)
    except (StorageError, RedisError) as e:
        log.warning("job %s not created: %s", job_id, e)
        _discard(storage, redis, job_id, idempotency_key)
        raise ApiError(503, "unavailable", f"the job could not be stored or queued: {e}") \
            from None
    return _accepted(jobs.describe(job, queue))


def _discard(storage: Storage, redis: Redis, job_id: str, idempotency_key: str | None) -> None:
    try:
        storage.delete_prefix(f"jobs/{job_id}/")
    except StorageError:
        pass
    if idempotency_key:
        try:
            redis.delete(IDEMPOTENCY_KEY.format(idempotency_key))
        except RedisError:
            pass


@router.get("/jobs/{job_id}", response_model=JobView, summary="Job status and result")
def get_job(job_id: str, redis: RedisDep, queue: QueueDep) -> JobView:
    return jobs.describe(jobs.fetch(redis, job_id), queue)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, summary="Cancel a job")
def cancel_job(job_id: str, redis: RedisDep, queue: QueueDep) -> JobView:
    job = jobs.fetch(redis, job_id)
    jobs.cancel(redis, job)
    return jobs.describe(job, queue)


def _download(job_id: str, name: str, redis: Redis, queue: Queue, storage: Storage,
              settings: Settings) -> Response:
    view = jobs.describe(jobs.fetch(redis, job_id), queue)
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
        raise ApiError(503, "storage_unavailable", str(e)) from None
    return StreamingResponse(body, media_type="image/png")


PNG = {200: {"content": {"image/png": {}}, "description": "the PNG"},
       307: {"description": "redirect to a presigned storage URL"}}


@router.get("/jobs/{job_id}/image", response_class=Response, responses=PNG,
            summary="The generated image")
def get_image(job_id: str, redis: RedisDep, queue: QueueDep, storage: StorageDep,
              settings: SettingsDep) -> Response:
    return _download(job_id, "image", redis, queue, storage, settings)


@router.get("/jobs/{job_id}/semantic_map", response_class=Response, responses=PNG,
            summary="The final semantic map over the image")
def get_semantic_map(job_id: str, redis: RedisDep, queue: QueueDep, storage: StorageDep,
                     settings: SettingsDep) -> Response:
    return _download(job_id, "semantic_map", redis, queue, storage, settings)
