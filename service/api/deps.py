"""FastAPI dependencies: the app's settings, Redis, queue and storage, and the API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from redis import Redis
from rq import Queue

from ..errors import ApiError
from ..settings import Settings
from ..storage import Storage

__all__ = ["SettingsDep", "RedisDep", "QueueDep", "StorageDep", "require_api_key"]


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
