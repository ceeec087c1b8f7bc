"""Fixtures of the gateway tests: an in-process app on a real Redis, and a gateway
process (a Stack) on local-folder storage."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.queueing import open_queue
from service.settings import Settings
from service.storage import LocalStorage

from ..helpers.stack import Stack


@pytest.fixture
def api(redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server, storage_url=f"file://{tmp_path}/store",
                        max_image_bytes=200_000, max_request_bytes=500_000,
                        max_image_pixels=1_000_000)
    storage = LocalStorage(tmp_path / "store")
    app = create_app(settings, storage=storage)
    with TestClient(app) as client:
        client.queue = open_queue(settings.queue_name, redis_db)
        client.store = tmp_path / "store"
        yield client


@pytest.fixture
def file_stack(redis_db, redis_server, tmp_path):
    stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 'store'}"},
                  tmp_path / "logs")
    stack.start_gateway()
    yield stack
    stack.stop()
