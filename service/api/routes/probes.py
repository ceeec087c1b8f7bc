"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from magicface_core.version import __version__

from ... import jobs, metrics
from ...errors import ApiError
from ...schemas import ErrorBody
from ...storage import StorageError
from ..deps import QueueDep, RedisDep, StorageDep, current_owner
from ..request_ids import request_id

router = APIRouter()
log = logging.getLogger("magicface.gateway")


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:  # on the event loop: never queued behind blocking work
    return {"status": "ok", "version": __version__}


@router.get("/readyz", summary="Redis and storage answer, and a warm worker (its model "
                              "loaded, WARMUP_SHAPES compiled) is registered",
            responses={503: {"model": ErrorBody}})
def readyz(request: Request, redis: RedisDep, storage: StorageDep, queue: QueueDep) -> dict:
    rid = request_id(request)
    try:
        redis.ping()
        ready = jobs.live_workers(redis, queue.name)
        warming = jobs.live_workers(redis, queue.name, warm=False)
    except RedisError as e:
        log.warning("request %s: readyz: Redis: %s", rid, e)
        raise ApiError(503, "redis_unavailable",
                       f"the job store does not answer (request {rid})") from None
    try:
        storage.check()
    except StorageError as e:
        log.warning("request %s: readyz: storage: %s", rid, e)
        raise ApiError(503, "storage_unavailable",
                       f"storage does not answer (request {rid})") from None
    if not ready:
        if warming:
            raise ApiError(503, "warming_up", f"{len(warming)} worker(s) for queue "
                                              f"{queue.name!r} are warming up "
                                              "(WARMUP_SHAPES), none is ready yet")
        raise ApiError(503, "no_worker", "no worker with a loaded model serves queue "
                                         f"{queue.name!r}")
    return {"status": "ready", "workers": len(ready), "warming": len(warming)}


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (with an API "
            "key when keys are set; METRICS_PORT serves them keyless on their own port)",
            responses={200: {"content": {"text/plain": {}}}},
            dependencies=[Depends(current_owner)])
async def metrics_endpoint(request: Request, redis: RedisDep, queue: QueueDep) -> Response:
    try:
        body = await run_in_threadpool(metrics.render, redis, queue)
    except RedisError as e:
        log.warning("request %s: metrics: Redis: %s", request_id(request), e)
        raise ApiError(503, "redis_unavailable",
                       f"the job store does not answer (request {request_id(request)})") \
            from None
    return Response(body, media_type="text/plain; version=0.0.4")
