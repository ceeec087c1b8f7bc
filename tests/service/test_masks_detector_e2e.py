"""Masks from the word through the API with a text-prompted detector: a worker with
MASK_DETECTOR set to a tiny random Grounding DINO folder (built here from a config; no
download) and MASK_THRESHOLD=0, so its random boxes are taken: the plumbing from the
gateway through the worker's proposer and back, for a word no face detector knows."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from ..helpers.detectors import tiny_grounding_dino
from ..helpers.images import noise_image
from ..helpers.stack import Stack

KEY = "detector-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def detector_stack(redis_server, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_server).flushdb()
    tmp = tmp_path_factory.mktemp("detector")
    dino = tiny_grounding_dino(tmp / "dino")
    stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp / 'store'}",
                   "API_KEYS": KEY, "MASK_DETECTOR": str(dino), "MASK_THRESHOLD": "0"},
                  tmp / "logs")
    try:
        stack.start_gateway()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()
        redis.Redis.from_url(redis_server).flushdb()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_a_thing_is_found_by_the_text_detector(detector_stack):
    img = noise_image(3, (90, 60))
    r = detector_stack.client.post("/v1/masks", headers={**AUTH, "Prefer": "wait=60"},
                                   files={"image": ("hat.png", _png(img), "image/png")},
                                   data={"word": "hat", "reference_prompt": "a red hat"})
    assert r.status_code == 201, (r.text, detector_stack.log("worker0"))
    body = r.json()
    assert body["status"] == "succeeded", (body, detector_stack.log("worker0"))
    res = body["result"]
    assert res["source"] == "detector+ellipse" and 0.0 <= res["score"] <= 1.0
    x0, y0, x1, y1 = res["box"]
    assert 0 <= x0 < x1 <= 90 and 0 <= y0 < y1 <= 60
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["mask"].split(",")[1]))))
    assert mask.shape == (60, 90) and (mask[y0:y1, x0:x1] > 127).sum() == (mask > 127).sum()


def test_a_job_without_masks_uses_the_detector(detector_stack):
    img = noise_image(5, (90, 60))  # a square one shrinks to 1x1 in the tiny backbone
    r = detector_stack.client.post("/v1/jobs", headers=AUTH, data={
        "prompt": "a man wearing a hat", "concepts": '[{"word": "hat"}]',
        "params": '{"steps": 2, "width": 64, "height": 64}'},
        files=[("images", ("hat.png", _png(img), "image/png"))])
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        view = detector_stack.client.get(f"/v1/jobs/{r.json()['id']}", headers=AUTH).json()
        if view["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert view["status"] == "succeeded", (view, detector_stack.log("worker0"))
    assert view["reproducibility"]["mask_sources"] == ["detector+ellipse"]
