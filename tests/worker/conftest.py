"""Fixtures of the worker tests: the tiny pipeline and the worker's runtime on a real
Redis and a local storage folder."""

from __future__ import annotations

import pytest

from magicface_core import MagicFacePipeline
from service.queueing import open_queue
from service.settings import Settings
from service.storage import LocalStorage
from worker import tasks


@pytest.fixture(scope="session")
def pipe() -> MagicFacePipeline:
    return MagicFacePipeline.tiny(seed=0)


@pytest.fixture
def runtime(pipe, redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server, storage_url=f"file://{tmp_path}",
                        storage_retry_s=2, redis_retry_s=5)
    storage = LocalStorage(tmp_path)
    queue = open_queue("worker-test", redis_db)
    old = tasks.RUNTIME
    tasks.RUNTIME = tasks.Runtime(pipe=pipe, settings=settings, storage=storage,
                                  redis=redis_db)
    yield tasks.RUNTIME, queue
    tasks.RUNTIME = old
