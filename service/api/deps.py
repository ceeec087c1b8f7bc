"""FastAPI dependencies: the app's settings, Redis, queue and storage, and the API key."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from rq import Queue

from ..errors import ApiError
from ..records import ANONYMOUS
from ..settings import Settings
from ..storage import Storage

__all__ = ["SettingsDep", "RedisDep", "QueueDep", "StorageDep", "OwnerDep", "current_owner",
           "authorized_owner", "key_id"]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def key_id(key: str) -> str:
    """What records and logs name an API key by: a hash, never the key."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:16]


def authorized_owner(settings: Settings, authorization: str | None) -> str | None:
    """The owner id the Authorization header proves, or None. Without API keys every
    caller is the anonymous owner. Every key is compared, in constant time, so the
    answer's timing says nothing about how close a guess was."""
    keys = settings.api_key_set
    if not keys:
        return ANONYMOUS
    scheme, _, token = (authorization or "").partition(" ")
    token_bytes = token.strip().encode()
    match = None
    for k in sorted(keys):
        if hmac.compare_digest(k.encode(), token_bytes):
            match = k
    if scheme.lower() != "bearer" or match is None:
        return None
    return key_id(match)


# Declares the bearer scheme in the OpenAPI document; the check itself is below.
bearer = HTTPBearer(auto_error=False, description="an API key (API_KEYS)")


def current_owner(request: Request,
                  authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
                  _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None
                  ) -> str:
    owner = authorized_owner(request.app.state.settings, authorization)
    if owner is None:
        raise ApiError(401, "unauthorized", "Authorization: Bearer <API key> is required")
    return owner


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StorageDep = Annotated[Storage, Depends(get_storage)]
OwnerDep = Annotated[str, Depends(current_owner)]
