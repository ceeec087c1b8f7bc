"""The FastAPI gateway: validates requests, stores inputs, queues jobs, serves results.

Never imports torch: validation uses Pillow and the library's torch-free config.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import jobs, metrics
from .errors import ApiError
from .settings import Settings
from .storage import Storage, StorageError, input_key, open_storage, output_key, request_key
from .validation import Upload, body_hash, validate_request

log = logging.getLogger("magicface.gateway")


# -- response models (the OpenAPI document) ---------------------------------------------
class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Progress(BaseModel):
    step: int
    total: int


class JobResult(BaseModel):
    image_url: str
    semantic_map_url: str | None = None


class CacheReport(BaseModel):
    hits: int
    misses: int


class JobView(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: Progress
    queue_position: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: ErrorDetail | None = None
    result: JobResult | None = None
    cache: CacheReport | None = None


ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)}


# -- dependencies -------------------------------------------------------------------------
def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def require_api_key(request: Request,
                    authorization: Annotated[str | None, Header()] = None) -> None:
    keys = request.app.state.settings.api_key_set
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() not in keys:
        raise ApiError(401, "unauthorized", "Authorization: Bearer <API key> is required")


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StorageDep = Annotated[Storage, Depends(get_storage)]


# -- /v1 ----------------------------------------------------------------------------------
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


async def _read(files: list[UploadFile] | None, limit: int) -> list[Upload]:
    out = []
    for f in files or []:
        data = await f.read(limit + 1)  # one byte over the limit is enough to refuse it
        out.append(Upload(f.filename, data))
    return out


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
            job = jobs.fetch(redis, owner)
            return _accepted(jobs.describe(job, queue))
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
            redis.delete(jobs.IDEMPOTENCY_KEY.format(idempotency_key))
        except RedisError:
            pass


def _accepted(view: dict) -> JSONResponse:
    return JSONResponse(view, status_code=202, headers={"Location": f"/v1/jobs/{view['id']}"})


@router.get("/jobs/{job_id}", response_model=JobView, summary="Job status and result")
def get_job(job_id: str, redis: RedisDep, queue: QueueDep) -> dict:
    return jobs.describe(jobs.fetch(redis, job_id), queue)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, summary="Cancel a job")
def cancel_job(job_id: str, redis: RedisDep, queue: QueueDep) -> dict:
    job = jobs.fetch(redis, job_id)
    jobs.cancel(redis, job)
    return jobs.describe(job, queue)


def _download(job_id: str, name: str, redis: Redis, queue: Queue, storage: Storage,
              settings: Settings) -> Response:
    job = jobs.fetch(redis, job_id)
    view = jobs.describe(job, queue)
    if view["status"] != "succeeded":
        raise ApiError(409, "not_ready", f"job {job_id} is {view['status']}, not succeeded")
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


# -- probes and metrics -------------------------------------------------------------------
probes = APIRouter()


@probes.get("/healthz", summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@probes.get("/readyz", summary="Redis answers and a worker with its model loaded is registered",
            responses={503: {"model": ErrorBody}})
def readyz(redis: RedisDep) -> dict:
    try:
        redis.ping()
        workers = [json.loads(v) for k in redis.scan_iter(jobs.WORKER_ALIVE_KEY.format("*"))
                   if (v := redis.get(k)) is not None]
    except RedisError as e:
        raise ApiError(503, "redis_unavailable", f"Redis does not answer: {e}") from None
    ready = [w for w in workers if w.get("model_loaded")]
    if not ready:
        raise ApiError(503, "no_worker", "no worker with a loaded model is registered")
    return {"status": "ready", "workers": len(ready)}


@probes.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}})
def metrics_endpoint(redis: RedisDep, queue: QueueDep) -> Response:
    try:
        body = metrics.render(redis, queue)
    except RedisError as e:
        raise ApiError(503, "redis_unavailable", f"Redis does not answer: {e}") from None
    return Response(body, media_type="text/plain; version=0.0.4")


# -- the app ------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, *, redis: Redis | None = None,
               storage: Storage | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="MagicFace", version="1.0.0",
                  description="Training-free universal-style human image customization: "
                              "submit a prompt and one reference per concept, poll, download.")
    app.state.settings = settings
    app.state.redis = redis or Redis.from_url(settings.redis_url, socket_timeout=5,
                                              socket_connect_timeout=3)
    app.state.queue = Queue(settings.queue_name, connection=app.state.redis)
    app.state.storage = storage or open_storage(
        settings.storage_url, endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region, public_url=settings.s3_public_url)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        # Multipart framing adds a little over the files themselves.
        if length and length.isdigit() and int(length) > settings.max_request_bytes + 2**20:
            return JSONResponse(ApiError(413, "request_too_large",
                                         f"request body of {length} bytes is over the "
                                         f"{settings.max_request_bytes}-byte limit").body(),
                                status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        field = ".".join(loc) or "request"
        return JSONResponse(ApiError(422, "invalid_request",
                                     f"{field}: {err.get('msg', 'invalid')}").body(),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(ApiError(e.status_code, code, str(e.detail)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RedisError)
    async def redis_down(_: Request, e: RedisError) -> JSONResponse:
        return JSONResponse(ApiError(503, "redis_unavailable", f"Redis: {e}").body(),
                            status_code=503)

    @app.exception_handler(StorageError)
    async def storage_down(_: Request, e: StorageError) -> JSONResponse:
        return JSONResponse(ApiError(503, "storage_unavailable", str(e)).body(),
                            status_code=503)

    app.include_router(router)
    app.include_router(probes)
    return app
