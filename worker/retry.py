"""Riding out outages: retry an operation with backoff for a bounded time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions

__all__ = ["retry", "REDIS_DOWN"]

log = logging.getLogger("magicface.worker")
T = TypeVar("T")

# What a Redis that is restarting or unreachable raises.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def retry(fn: Callable[[], T], *, errors: tuple[type[BaseException], ...], within_s: float,
          what: str, first_delay: float = 0.5, max_delay: float = 5.0,
          give_up: Callable[[], bool] | None = None) -> T:
    """`fn()` until it returns; on `errors`, wait (doubling, up to `max_delay`) and try
    again, until `within_s` seconds have passed or `give_up()` says so, then re-raise."""
    deadline = time.monotonic() + within_s
    delay = first_delay
    while True:
        try:
            return fn()
        except errors as e:
            if time.monotonic() + delay > deadline or (give_up is not None and give_up()):
                raise
            log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
