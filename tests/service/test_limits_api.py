"""GET /v1/limits reports what the gateway checks: the library's table with the
operator's lower settings, and the defaults a request gets."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from magicface_core.config import GenerationConfig
from magicface_core.limits import LIMITS, TEXT_LIMITS
from magicface_core.rules import DEFAULT_PRESET, DEFAULT_WEIGHT, PRESETS
from service.app import create_app
from service.settings import Settings

from ..helpers.images import png
from ..helpers.multipart import job_form


@pytest.fixture
def limited(redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server, storage_url=f"file://{tmp_path}",
                        api_keys="k" * 20, max_steps=30, max_size=768, max_concepts=2,
                        max_image_bytes=2**20)
    with TestClient(create_app(settings)) as client:
        yield client


def test_limits_are_the_configured_ones_without_a_key(limited):
    r = limited.get("/v1/limits")
    assert r.status_code == 200
    body = r.json()
    assert body["params"]["steps"] == {"min": 1, "max": 30, "min_exclusive": False,
                                       "multiple_of": None,
                                       "default": GenerationConfig().steps}
    assert body["params"]["width"]["max"] == 768
    assert body["params"]["width"]["multiple_of"] == LIMITS["width"].multiple_of
    assert body["params"]["width"]["default"] == GenerationConfig().width
    assert body["params"]["seed"]["max"] == 2**63 - 1  # exact: not a float
    assert body["concepts"]["max"] == 2
    assert body["concept"]["weight"]["default"] == DEFAULT_WEIGHT
    assert body["concept"]["weight"]["min_exclusive"] is True
    assert body["text"] == TEXT_LIMITS
    assert body["image"]["max_bytes"] == 2**20
    assert body["presets"] == list(PRESETS) and body["default_preset"] == DEFAULT_PRESET


def test_the_reported_maximum_is_the_one_enforced(limited):
    """One past the reported maximum is refused, the maximum itself is not."""
    most = limited.get("/v1/limits").json()["params"]["steps"]["max"]
    auth = {"Authorization": "Bearer " + "k" * 20}
    for steps, status in ((most + 1, 422), (most, 202)):
        form = job_form("a man", [{"word": "man"}], [png()], [png()],
                        {"steps": steps})
        r = limited.post("/v1/jobs", **form, headers=auth)
        assert r.status_code == status, r.text
