"""Gateway behaviour: validation (4xx naming the field), nothing queued or stored on
rejection, idempotency, auth, the OpenAPI document, and no torch in the gateway."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.queueing import open_queue
from service.settings import Settings
from service.storage import LocalStorage

from ..helpers.examples import EXAMPLES, SHARED_EXAMPLES, example, shared_example_names
from ..helpers.images import png
from ..helpers.multipart import job_form

ROOT = Path(__file__).resolve().parents[2]


def post(client, prompt="a man wearing a hat", concepts=None, images=None, masks=None,
         params=None, headers=None):
    concepts = concepts if concepts is not None else [{"word": "man"}, {"word": "hat"}]
    images = images if images is not None else [png(), png()]
    masks = masks if masks is not None else [png(), png()]
    return client.post("/v1/jobs", **job_form(prompt, concepts, images, masks, params),
                       headers=headers or {})


def assert_rejected(client, r, status, code, field=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    if field:
        assert field in err["message"], err
    assert client.queue.count == 0
    assert not any(p.is_file() for p in client.store.rglob("*"))


def test_accepted_job_is_stored_and_queued(api):
    r = post(api, params={"steps": 3, "width": 128, "height": 128})
    assert r.status_code == 202
    view = r.json()
    assert view["status"] == "queued" and view["queue_position"] == 0
    assert view["progress"] == {"step": 0, "total": 3, "percent": 0.0, "eta_s": None,
                                "stage": "queued"}
    assert api.queue.count == 1
    rec = json.loads((api.store / f"jobs/{view['id']}/request.json").read_text())
    assert rec["prompt"] == "a man wearing a hat" and rec["params"]["steps"] == 3
    # The authors' preset unless asked otherwise; its details resolve in the worker.
    assert (rec["params"]["preset"], rec["params"]["ca_scale"]) == ("authors", None)
    assert rec["params"]["negative_prompt"] is None
    assert api.get(f"/v1/jobs/{view['id']}").json()["id"] == view["id"]


def test_preset_and_ca_scale_are_stored_for_the_worker(api):
    r = post(api, params={"steps": 3, "preset": "paper", "ca_scale": 0.7})
    assert r.status_code == 202
    rec = json.loads((api.store / f"jobs/{r.json()['id']}/request.json").read_text())
    assert (rec["params"]["preset"], rec["params"]["ca_scale"]) == ("paper", 0.7)
    from service.validation import Params

    cfg = Params.model_validate(rec["params"]).to_config().resolve(2)
    assert (cfg.preset, cfg.ca_scale, cfg.region_guidance) == ("paper", 0.7, False)
    # A record from before these fields existed still reads (as the defaults).
    old = {k: v for k, v in rec["params"].items() if k not in ("preset", "ca_scale")}
    assert Params.model_validate(old).to_config().preset == "authors"


@pytest.mark.parametrize("kwargs,status,code,field", [
    (dict(prompt=" "), 422, "invalid_prompt", "prompt"),
    (dict(concepts=[{"word": "scarf"}, {"word": "hat"}]), 422, "word_not_in_prompt",
     "concepts[0].word"),
    (dict(concepts="not json"), 422, "invalid_concepts", "concepts"),
    (dict(concepts=[]), 422, "invalid_concepts", "concepts"),
    (dict(concepts=[{"word": "man"}] * 5, images=[png()] * 5, masks=[png()] * 5), 422,
     "invalid_concepts", "concepts"),
    (dict(concepts=[{"word": "man", "weight": 0}, {"word": "hat"}]), 422, "invalid_concepts",
     "concepts[0].weight"),
    (dict(concepts=[{"word": "man", "colour": "red"}, {"word": "hat"}]), 422,
     "invalid_concepts", "concepts[0].colour"),
    (dict(images=[png()]), 422, "image_count_mismatch", "images"),
    (dict(masks=[png()]), 422, "mask_count_mismatch", "masks"),
    (dict(masks=[]), 422, "masks_required", "masks"),
    (dict(images=[b"this is not an image", png()]), 422, "invalid_image", "images[0]"),
    (dict(images=[png(fmt="GIF"), png()]), 422, "invalid_image", "images[0]"),
    (dict(masks=[png((10, 10)), png()]), 422, "mask_size_mismatch", "masks[0]"),
    (dict(params={"steps": 0}), 422, "invalid_params", "params.steps"),
    (dict(params={"steps": 201}), 422, "invalid_params", "params.steps"),
    (dict(params={"width": 100}), 422, "invalid_params", "width"),
    (dict(params={"alpha": 1.5}), 422, "invalid_params", "params.alpha"),
    (dict(params={"nope": 1}), 422, "invalid_params", "params.nope"),
    (dict(params="[1, 2]"), 422, "invalid_params", "params"),
    (dict(params={"preset": "fancy"}), 422, "invalid_params", "params.preset"),
    (dict(params={"ca_scale": 0}), 422, "invalid_params", "params.ca_scale"),
    (dict(params={"ca_scale": 1.5}), 422, "invalid_params", "params.ca_scale"),
    (dict(images=[png((1200, 1000)), png()], masks=[png((1200, 1000)), png()]), 413,
     "image_too_large", "images[0]"),
])
def test_bad_requests_name_the_field_and_queue_nothing(api, kwargs, status, code, field):
    assert_rejected(api, post(api, **kwargs), status, code, field)


def test_file_over_the_byte_limit_is_413(api):
    rng = __import__("numpy").random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype="uint8"))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    assert len(buf.getvalue()) > 200_000
    r = post(api, images=[buf.getvalue(), png()], masks=[png((300, 300)), png()])
    assert_rejected(api, r, 413, "file_too_large", "images[0]")


def test_request_over_the_total_limit_is_413(api):
    r = api.post("/v1/jobs", content=b"x" * 2_000_000,
                 headers={"content-type": "multipart/form-data; boundary=x"})
    assert_rejected(api, r, 413, "request_too_large")


def test_missing_form_field_is_422_naming_it(api):
    r = api.post("/v1/jobs", data={"prompt": "a man"}, files=[("images", ("a.png", png()))])
    assert_rejected(api, r, 422, "invalid_request", "concepts")


def test_unknown_job_is_404(api):
    for path in ("/v1/jobs/0123abc", "/v1/jobs/0123abc/image", "/v1/jobs/nope!/cancel"):
        r = api.get(path) if "cancel" not in path else api.post(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_result_of_an_unfinished_job_is_409(api):
    view = post(api).json()
    r = api.get(f"/v1/jobs/{view['id']}/image")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"


def test_cancel_queued_then_again_is_409(api):
    view = post(api).json()
    r = api.post(f"/v1/jobs/{view['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert api.queue.count == 0
    r = api.post(f"/v1/jobs/{view['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_idempotency_key(api):
    headers = {"Idempotency-Key": "order-42"}
    a = post(api, headers=headers)
    b = post(api, headers=headers)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    assert api.queue.count == 1
    c = post(api, prompt="a man wearing a red hat", headers=headers)
    assert c.status_code == 422 and c.json()["error"]["code"] == "idempotency_conflict"
    d = post(api, headers={"Idempotency-Key": "order-43"})
    assert d.json()["id"] != a.json()["id"] and api.queue.count == 2


def test_api_keys(redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server, api_keys="k1, k2")
    app = create_app(settings, storage=LocalStorage(tmp_path))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
            r = client.get("/v1/jobs/abc", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = client.get("/v1/jobs/abc", headers={"Authorization": "Bearer k2"})
        assert r.status_code == 404


@pytest.mark.parametrize("root,name", [(EXAMPLES, n) for n in ("synthetic", "trio", "solo")]
                         + [(SHARED_EXAMPLES, n) for n in shared_example_names()])
def test_examples_are_accepted(redis_db, redis_server, tmp_path, root, name):
    data = example(name, root)
    app = create_app(Settings(redis_url=redis_server), storage=LocalStorage(tmp_path))
    concepts = [{k: c[k] for k in ("word", "weight", "reference_prompt")}
                for c in data["concepts"]]
    with TestClient(app) as client:
        r = client.post("/v1/jobs", **job_form(
            data["prompt"], concepts, [c["image"] for c in data["concepts"]],
            [c["mask"] for c in data["concepts"]], {"seed": data["seed"]}))
    assert r.status_code == 202, r.text


def test_openapi_document_is_current():
    proc = subprocess.run([sys.executable, "scripts/export_openapi.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gateway_never_imports_torch():
    code = ("import sys, service.app, service.__main__, service.validation, service.jobs;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_storage_down_is_503_and_nothing_is_queued(redis_db, redis_server):
    from service.storage import S3Storage

    from ..helpers.stack import free_port

    dead = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    app = create_app(Settings(redis_url=redis_server), storage=dead)
    queue = open_queue(Settings().queue_name, redis_db)
    with TestClient(app) as client:
        r = post(client, headers={"Idempotency-Key": "k-down"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert queue.count == 0
        # The idempotency key was released: a retry is not tied to the failed attempt.
        assert redis_db.get("magicface:idem:k-down") is None


def test_redis_down_is_503(tmp_path):
    from redis import Redis

    from ..helpers.stack import free_port

    app = create_app(Settings(), redis=Redis(port=free_port(), socket_connect_timeout=0.5),
                     storage=LocalStorage(tmp_path))
    with TestClient(app) as client:
        r = client.get("/v1/jobs/" + "ab12" * 8)  # a well-formed id: Redis is asked
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable"
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
