"""Masks from the concept word, made by a real worker process (the tiny model,
MASK_FACES=true: facenet-pytorch's MTCNN with its shipped weights) on real photos
(scikit-image's astronaut, a woman; chelsea, a cat): POST /v1/masks, and a job sent
without masks."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as samples

from ..helpers.stack import Stack

KEY, OTHER = "mask-key-0123456789", "other-key-0123456789"


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _mask(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def mask_stack(redis_server, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_server).flushdb()
    tmp = tmp_path_factory.mktemp("masks")
    stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp / 'store'}",
                   "API_KEYS": f"{KEY},{OTHER}", "MASK_FACES": "true"}, tmp / "logs")
    try:
        stack.start_gateway()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()
        redis.Redis.from_url(redis_server).flushdb()


def _propose(stack, image: bytes, word: str, key: str = KEY, wait: int | None = 60):
    headers = {"Authorization": f"Bearer {key}"}
    if wait is not None:
        headers["Prefer"] = f"wait={wait}"
    return stack.client.post("/v1/masks", files={"image": ("ref.png", image, "image/png")},
                             data={"word": word}, headers=headers)


def test_a_person_word_gets_the_head_and_shoulders_of_the_photo(mask_stack):
    photo = samples.astronaut()
    r = _propose(mask_stack, _png(photo), "woman")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["word"] == "woman"
    result = body["result"]
    assert result["source"] == "face+ellipse"
    mask = _mask(result["mask"])
    assert mask.shape == photo.shape[:2]
    x0, y0, x1, y1 = result["box"]
    h, w = photo.shape[:2]
    # Her face is in the upper half of the photo, left of centre; the mask lies in the box.
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and y0 < h / 2 and x0 < w / 2
    inside = mask[y0:y1, x0:x1] > 127
    assert inside.sum() == (mask > 127).sum() > 0.02 * h * w
    # GET returns the same proposal, to its owner only.
    again = mask_stack.client.get(f"/v1/masks/{body['id']}",
                                  headers={"Authorization": f"Bearer {KEY}"})
    assert again.status_code == 200 and again.json()["result"] == result
    other = mask_stack.client.get(f"/v1/masks/{body['id']}",
                                  headers={"Authorization": f"Bearer {OTHER}"})
    assert other.status_code == 404


def test_nothing_found_is_an_answer_naming_the_word(mask_stack):
    r = _propose(mask_stack, _png(samples.chelsea()), "man")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "failed" and body["result"] is None
    assert "'man'" in body["error"]["message"], body
    assert "pass a mask" in body["error"]["message"], body


def test_without_wait_the_proposal_is_accepted_and_polled(mask_stack):
    r = _propose(mask_stack, _png(samples.astronaut()), "face", wait=None)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/v1/masks/{r.json()['id']}"
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = mask_stack.client.get(r.headers["Location"],
                                     headers={"Authorization": f"Bearer {KEY}"}).json()
        if view["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert view["status"] == "succeeded", view


def _wait_job(stack, job_id: str, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = stack.client.get(f"/v1/jobs/{job_id}",
                                headers={"Authorization": f"Bearer {KEY}"}).json()
        if view["status"] in ("succeeded", "failed", "canceled", "expired"):
            return view
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {view}")


def test_a_job_without_masks_gets_proposed_ones(mask_stack):
    """A job sent without masks: the worker proposes each from its word; nothing
    found fails the job invalid_input naming the reference."""
    auth = {"Authorization": f"Bearer {KEY}"}
    face = _png(samples.astronaut()[::4, ::4])
    r = mask_stack.client.post("/v1/jobs", headers=auth, data={
        "prompt": "a woman", "concepts": '[{"word": "woman"}]',
        "params": '{"steps": 2, "width": 64, "height": 64}'},
        files=[("images", ("face.png", face, "image/png"))])
    assert r.status_code == 202, r.text
    done = _wait_job(mask_stack, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["reproducibility"]["mask_sources"] == ["face+ellipse"], done
    cat = _png(samples.chelsea()[::2, ::2])
    r = mask_stack.client.post("/v1/jobs", headers=auth, data={
        "prompt": "a man", "concepts": '[{"word": "man"}]',
        "params": '{"steps": 2, "width": 64, "height": 64}'},
        files=[("images", ("cat.png", cat, "image/png"))])
    assert r.status_code == 202, r.text
    done = _wait_job(mask_stack, r.json()["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_input", done
    assert "no 'man' found in reference 1" in done["error"]["message"], done
