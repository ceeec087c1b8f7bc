"""The FastAPI gateway: validates requests, stores inputs, queues jobs, serves results.

The app itself: state, the body-size guard, the error handlers (every error is
{"error": {"code", "message"}}), and the routers of `api.routes`. Never imports torch:
validation uses Pillow and the library's torch-free config.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import jobs
from .api.routes import jobs as job_routes
from .api.routes import probes as probe_routes
from .api.routes.jobs import JOB_ERROR_STATUS
from .errors import ApiError
from .settings import Settings
from .storage import Storage, StorageError, open_storage


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

    _install_error_handlers(app)
    app.include_router(job_routes.router)
    app.include_router(probe_routes.router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as {"error": {"code", "message"}}."""

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

    @app.exception_handler(jobs.JobError)
    async def job_error(_: Request, e: jobs.JobError) -> JSONResponse:
        status = JOB_ERROR_STATUS.get(type(e), 409)
        return JSONResponse(ApiError(status, e.code, str(e)).body(), status_code=status)
