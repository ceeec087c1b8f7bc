"""POST /v1/masks and jobs without masks, at the gateway: its refusals name the field,
and `masks_required` comes only after the images' own errors."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as samples

from service.app import create_app
from service.queueing import open_queue
from service.settings import Settings
from service.storage import LocalStorage
from service.workers import register

KEY = "mask-key-0123456789"


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


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
    uri = ("data:image/png;base64,"
           + base64.b64encode(_png(samples.chelsea()[:64, :64])).decode())
    r = client.post("/v1/masks", json={"image": uri, "word": "cat"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["word"] == "cat"
    assert open_queue(settings.mask_queue_name, redis_db).count == 1
    r = client.post("/v1/masks", json={"image": 7, "word": "cat"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("image"), r.text


def test_masks_required_comes_after_the_image_errors(gateway):
    client, settings, redis_db = gateway
    r = client.post("/v1/jobs", data={"prompt": "a man", "concepts": '[{"word": "man"}]'},
                    files=[("images", ("x.png", b"not an image", "image/png"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image", r.text
    r = client.post("/v1/jobs", data={"prompt": "a man", "concepts": '[{"word": "man"}]'},
                    files=[("images", ("x.png", _png(samples.chelsea()[:64, :64]),
                                       "image/png"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "masks_required", r.text


def test_a_planted_record_under_a_mask_id_is_unknown(gateway):
    """A pickled or hand-written record where a proposal id points: 404, never 5xx."""
    import pickle

    client, settings, redis_db = gateway
    for job_id, fields in (("a" * 32, {"data": pickle.dumps(("x",)), "meta": b"{}"}),
                           ("b" * 32, {"data": b"not json", "meta": pickle.dumps({})}),
                           ("c" * 32, {"data": b'["worker.tasks.generate", null, [], {}]',
                                       "meta": b'{"owner": "public"}'})):
        redis_db.hset(f"rq:job:{job_id}", mapping={**fields, "status": "finished"})
        r = client.get(f"/v1/masks/{job_id}")
        assert r.status_code == 404, (job_id, r.text)
