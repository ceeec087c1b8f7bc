"""The FastAPI gateway: validates requests, stores inputs, queues jobs, serves results.

The app itself: state, the outer middleware (request ids, streamed body limit, docs
guard), the error handlers (every error is {"error": {"code", "message"}}, internals
only in the server log under the request id), and the routers of `api.routes`. Never
imports torch: validation uses Pillow and the library's torch-free config.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from magicface_core.version import __version__

from . import jobs
from .api import openapi
from .api.middleware import GatewayMiddleware
from .api.request_ids import request_id
from .api.routes import jobs as job_routes
from .api.routes import limits as limit_routes
from .api.routes import masks as mask_routes
from .api.routes import probes as probe_routes
from .api.routes.jobs import JOB_ERROR_STATUS
from .errors import ApiError
from .queueing import open_queue
from .reaper import reap
from .settings import Settings
from .storage import Storage, StorageError, open_storage

log = logging.getLogger("magicface.gateway")

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
              413: "request_too_large"}


def create_app(settings: Settings | None = None, *, redis: Redis | None = None,
               storage: Storage | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="MagicFace", version=__version__,
                  description="Training-free universal-style human image customization: "
                              "submit a prompt and one reference per concept; follow the "
                              "job by polling, server-sent events or signed webhooks; "
                              "download the image.",
                  lifespan=_lifespan, docs_url=None, redoc_url=None,
                  generate_unique_id_function=lambda route: route.name)
    app.state.settings = settings
    app.state.redis = redis or Redis.from_url(settings.redis_url, socket_timeout=5,
                                              socket_connect_timeout=3)
    app.state.queue = open_queue(settings.queue_name, app.state.redis)
    app.state.storage = storage or open_storage(
        settings.storage_url, endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region, public_url=settings.s3_public_url,
        create_bucket=settings.s3_create_bucket)
    app.add_middleware(GatewayMiddleware, settings=settings)
    _install_error_handlers(app)
    app.include_router(job_routes.router)
    app.include_router(probe_routes.router)
    app.include_router(limit_routes.router)
    app.include_router(mask_routes.router)
    _install_page(app)
    _install_docs(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    # Blocking reads of event streams (SSE, Prefer: wait) park on the event loop, not
    # in threads: an async client, made in the loop that serves.
    app.state.aredis = AsyncRedis.from_url(app.state.settings.redis_url,
                                           socket_connect_timeout=3, socket_timeout=60)
    reaper = asyncio.create_task(_reap_forever(app))
    try:
        yield
    finally:
        reaper.cancel()
        await app.state.aredis.aclose()


async def _reap_forever(app: FastAPI) -> None:
    """Fail abandoned jobs (worker_lost) from the gateway too: with no worker alive,
    nobody else would, and the job would read `running` forever."""
    s = app.state.settings
    interval = max(1, s.worker_maintenance_interval_s)
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(reap, app.state.redis, app.state.queue, s.result_ttl_s,
                                    interval, False, s.reaper_settle_s)
        except Exception as e:  # noqa: BLE001 - Redis may be down: the next round retries
            log.warning("reaper: %s", e)


def _our_validation_errors(doc: dict) -> None:
    """FastAPI documents its own 422 body; ours is the one error shape."""
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            r = op.get("responses", {}).get("422")
            if r and "HTTPValidationError" in str(r):
                op["responses"]["422"] = {
                    "description": "`error.code`: " + ", ".join(openapi.ERROR_CODES[422]),
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _install_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc from assets shipped in a Python package (fastapi-offline),
    so /docs works without internet; the schema gains the models only the hand-written
    request bodies name."""
    import fastapi_offline

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="MagicFace API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="MagicFace API",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png",
                              with_google_fonts=False)

    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version,
                              description=app.description, routes=app.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in openapi.EXTRA_SCHEMAS:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in js.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components.setdefault(model.__name__, js)
            _our_validation_errors(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema


STATIC = Path(__file__).parent / "static"


def _install_page(app: FastAPI) -> None:
    """The web page at / (plain files, no build step); it calls the API with the key
    the user types, so the page itself needs none."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _json(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as {"error": {"code", "message"}}; a fault
    of Redis, storage or the code is logged with the request id, and the client gets
    the id, not the internals (hosts, paths, buckets)."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _json(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        field = ".".join(loc) or "request"
        return _json(ApiError(422, "invalid_request", f"{field}: {err.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(e.status_code, "http_error")
        return JSONResponse(ApiError(e.status_code, code, str(e.detail)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, e: RedisError) -> JSONResponse:
        rid = request_id(request)
        log.warning("request %s: Redis: %s", rid, e)
        return _json(ApiError(503, "redis_unavailable",
                              f"the job store is unavailable (request {rid})"))

    @app.exception_handler(StorageError)
    async def storage_down(request: Request, e: StorageError) -> JSONResponse:
        rid = request_id(request)
        log.warning("request %s: storage: %s", rid, e)
        return _json(ApiError(503, "storage_unavailable",
                              f"storage is unavailable (request {rid})"))

    @app.exception_handler(jobs.JobError)
    async def job_error(_: Request, e: jobs.JobError) -> JSONResponse:
        status = JOB_ERROR_STATUS.get(type(e), 409)
        return _json(ApiError(status, e.code, str(e)))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        rid = request_id(request)
        log.exception("request %s failed", rid)
        return _json(ApiError(500, "internal_error",
                              f"the request failed unexpectedly (request {rid})"))
