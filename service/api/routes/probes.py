"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import Response
from redis.exceptions import RedisError

from ... import metrics
from ...errors import ApiError
from ...keys import WORKER_ALIVE_KEY
from ...schemas import ErrorBody
from ..deps import QueueDep, RedisDep

router = APIRouter()


@router.get("/healthz", summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis answers and a worker with its model loaded is registered",
            responses={503: {"model": ErrorBody}})
def readyz(redis: RedisDep) -> dict:
    try:
        redis.ping()
        workers = [json.loads(v) for k in redis.scan_iter(WORKER_ALIVE_KEY.format("*"))
                   if (v := redis.get(k)) is not None]
    except RedisError as e:
        raise ApiError(503, "redis_unavailable", f"Redis does not answer: {e}") from None
    ready = [w for w in workers if w.get("model_loaded")]
    if not ready:
        raise ApiError(503, "no_worker", "no worker with a loaded model is registered")
    return {"status": "ready", "workers": len(ready)}


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}})
def metrics_endpoint(redis: RedisDep, queue: QueueDep) -> Response:
    try:
        body = metrics.render(redis, queue)
    except RedisError as e:
        raise ApiError(503, "redis_unavailable", f"Redis does not answer: {e}") from None
    return Response(body, media_type="text/plain; version=0.0.4")
