"""Fixtures shared by the service and worker tests: a real Redis and a real S3 endpoint
(moto on loopback). Helpers live in tests/helpers."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def redis_server():
    from .helpers.stack import redis_url

    url, proc = redis_url()
    yield url
    if proc is not None:
        proc.terminate()


@pytest.fixture
def redis_db(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    from .helpers.stack import free_port

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
