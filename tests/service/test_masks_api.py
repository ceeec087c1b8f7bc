"""POST /v1/masks: a mask from the concept word, made by a real worker process (the tiny
model, MASK_FACES=true: facenet-pytorch's MTCNN with its shipped weights) on real
photos (scikit-image's astronaut, a woman; chelsea, a cat); and the gateway's refusals."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as samples

from service.app import create_app
from service.queueing import open_queue
from service.settings import Settings
from service.storage import LocalStorage
from service.workers import register

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


@pytest.fixture
def gateway(redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server, api_keys=KEY, max_image_bytes=200_000)
    with TestClient(create_app(settings, storage=LocalStorage(tmp_path))) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client, settings, redis_db


def test_no_mask_worker_is_a_503_not_a_wait_forever(gateway):
    client, settings, redis_db = gateway
    register(redis_db, settings.queue_name, "plain", {"model_loaded": True}, 60)
    r = client.post("/v1/masks", files={"image": ("a.png", _png(samples.chelsea()))},
                    data={"word": "cat"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_mask_worker", r.text


PHOTO = "a small real photo"


@pytest.mark.parametrize("files,data,status,field", [
    # A multipart body with no file: the word as a plain part.
    ({"word": (None, "hat")}, {}, 422, "image"),
    ({"image": ("a.png", b"not an image")}, {"word": "hat"}, 422, "image"),
    ({"image": ("a.png", b"\x89PNG" + b"0" * 300_000)}, {"word": "hat"}, 413, "image"),
    ({"image": ("a.png", PHOTO)}, {}, 422, "word"),
    ({"image": ("a.png", PHOTO)}, {"word": "  "}, 422, "word"),
    ({"image": ("a.png", PHOTO)}, {"word": "h" * 65}, 422, "word"),
])
def test_bad_requests_name_the_field(gateway, files, data, status, field):
    client, settings, redis_db = gateway
    register(redis_db, settings.queue_name, "masker", {"model_loaded": True, "masks": True},
             60)
    files = {k: (n, _png(samples.chelsea()[:64, :64]) if b == PHOTO else b)
             for k, (n, b) in files.items()}
    r = client.post("/v1/masks", files=files, data=data)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"].startswith(field), r.text
    assert open_queue(settings.mask_queue_name, redis_db).count == 0


def test_json_body_takes_a_data_uri(gateway):
    client, settings, redis_db = gateway
    register(redis_db, settings.queue_name, "masker", {"model_loaded": True, "masks": True},
             60)
    uri = "data:image/png;base64," + base64.b64encode(_png(samples.chelsea()[:64, :64])).decode()
    r = client.post("/v1/masks", json={"image": uri, "word": "cat"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["word"] == "cat"
    assert open_queue(settings.mask_queue_name, redis_db).count == 1
    r = client.post("/v1/masks", json={"image": 7, "word": "cat"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("image"), r.text
