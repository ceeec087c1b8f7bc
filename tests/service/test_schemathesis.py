"""Stateless property-based checks of the gateway against its own OpenAPI document:
whatever schemathesis generates, the answer is never a 5xx (nor undocumented)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.app import create_app
from service.settings import Settings
from service.storage import LocalStorage
from service.workers import register


def test_no_server_errors(redis_db, redis_server, tmp_path):
    app = create_app(Settings(redis_url=redis_server, max_image_bytes=100_000,
                              max_request_bytes=400_000),
                     storage=LocalStorage(tmp_path / "store"))
    # /readyz answers 503 by design without a worker: register one as a worker does.
    register(redis_db, Settings().queue_name, "schemathesis", {"model_loaded": True,
                                                                  "masks": True}, 600)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])

        check()
        checked.append(operation.label)
    assert {"POST /v1/jobs", "GET /v1/limits", "POST /v1/masks"} <= set(checked)
    assert len(checked) == 16
