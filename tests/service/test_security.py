"""The gateway as an attacker and an operator see it, in process on a real Redis:
API keys isolate owners, documents and metrics need a key, ids and messages give
nothing away, uploads are turned as displayed, a queued cancel frees its uploads."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from service.storage import LocalStorage, StorageError

from ..helpers.images import png
from ..helpers.multipart import job_form

K1, K2 = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}


def submit(client, headers=None, **kw):
    form = job_form(kw.get("prompt", "a man wearing a hat"), [{"word": "man"}, {"word": "hat"}],
                    [png(), png()], [png(), png()], kw.get("params"))
    return client.post("/v1/jobs", **form, headers=headers or {})


@pytest.fixture
def keyed(redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server, api_keys="key-one,key-two",
                        storage_url=f"file://{tmp_path}")
    with TestClient(create_app(settings, storage=LocalStorage(tmp_path))) as client:
        client.store = tmp_path
        yield client


def test_one_keys_jobs_are_invisible_to_another(keyed):
    job = submit(keyed, {**K1, "Idempotency-Key": "same"}).json()
    for method, path in (("get", f"/v1/jobs/{job['id']}"), ("get", f"/v1/jobs/{job['id']}/image"),
                         ("get", f"/v1/jobs/{job['id']}/semantic_map"),
                         ("post", f"/v1/jobs/{job['id']}/cancel")):
        r = getattr(keyed, method)(path, headers=K2)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert keyed.get(f"/v1/jobs/{job['id']}", headers=K1).status_code == 200
    # Idempotency keys are per owner: key 2's "same" is its own job.
    other = submit(keyed, {**K2, "Idempotency-Key": "same"}).json()
    assert other["id"] != job["id"]
    again = submit(keyed, {**K1, "Idempotency-Key": "same"}).json()
    assert again["id"] == job["id"]
    # Records name the owner by a key id, never the key.
    rec = json.loads((keyed.store / f"jobs/{job['id']}/request.json").read_text())
    raw = keyed.app.state.redis.hgetall(f"rq:job:{job['id']}")
    assert b"key-one" not in b"".join(raw.values()) and "key-one" not in json.dumps(rec)


def test_documents_and_metrics_need_a_key_unless_published(keyed, redis_server, tmp_path):
    for path in ("/docs", "/openapi.json", "/metrics"):
        r = keyed.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
        assert keyed.get(path, headers=K1).status_code == 200, path
    assert keyed.get("/healthz").status_code == 200
    public = Settings(redis_url=redis_server, api_keys="key-one", public_docs=True)
    with TestClient(create_app(public, storage=LocalStorage(tmp_path))) as client:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/metrics").status_code == 401


def test_request_ids_are_echoed(api):
    r = api.get("/healthz")
    assert len(r.headers["x-request-id"]) == 32
    assert api.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers[
        "x-request-id"] == "abc-123"
    bad = "no spaces; " + "x" * 80
    assert api.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"] != bad


@pytest.mark.parametrize("job_id", ["ééééé", "٣٣٣", "abc", "A" * 32, "0" * 33, "../x"])
def test_foreign_job_ids_are_unknown_not_errors(api, job_id):
    r = api.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


class DownStorage(LocalStorage):
    def put(self, key, data, content_type="application/octet-stream"):
        raise StorageError(f"connect to http://10.0.0.7:9000/secret-bucket failed for {key} "
                           f"under {self.root}")

    def check(self):
        raise StorageError(f"head bucket secret-bucket at {self.root} failed")


def test_client_messages_carry_a_request_id_not_internals(redis_db, redis_server, tmp_path):
    settings = Settings(redis_url=redis_server)
    with TestClient(create_app(settings, storage=DownStorage(tmp_path))) as client:
        r = submit(client)
        msg = r.json()["error"]["message"]
        assert r.status_code == 503 and r.headers["x-request-id"] in msg
        for secret in ("10.0.0.7", "secret-bucket", str(tmp_path)):
            assert secret not in msg
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        assert "secret-bucket" not in r.json()["error"]["message"]
    down = Settings(redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(down, storage=LocalStorage(tmp_path))) as client:
        r = client.get("/v1/jobs/" + "a" * 32)
        assert r.status_code == 503 and "127.0.0.1" not in r.json()["error"]["message"]
        assert ":1" not in r.json()["error"]["message"]


def test_decoder_messages_carry_no_heap_addresses(api):
    form = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}],
                    [b"\x89PNG not really", png()], [png(), png()])
    r = api.post("/v1/jobs", **form)
    assert r.status_code == 422 and "0x" not in r.json()["error"]["message"]


def exif_photo(size=(60, 40), orientation=6) -> bytes:
    img = Image.new("RGB", size, (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied_before_the_size_check(api):
    # Stored 60x40, displayed 40x60 (a phone held upright): the mask is drawn on what is
    # displayed, so a 40x60 mask fits and a 60x40 one does not.
    photo = exif_photo()
    ok = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}], [photo, png()],
                  [png((40, 60)), png()])
    assert api.post("/v1/jobs", **ok).status_code == 202
    bad = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}], [photo, png()],
                   [png((60, 40)), png()])
    r = api.post("/v1/jobs", **bad)
    assert r.status_code == 422 and r.json()["error"]["code"] == "mask_size_mismatch"
    from magicface_core.masks import load_image

    assert load_image(photo).size == (40, 60)


def test_a_queued_cancel_frees_its_uploads_and_counts(api):
    job = submit(api).json()
    assert any((api.store / f"jobs/{job['id']}").rglob("*"))
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    left = [p for p in (api.store / f"jobs/{job['id']}").rglob("*") if p.is_file()]
    assert left == []
    assert 'magicface_jobs_ended_total{status="canceled"} 1.0' in api.get("/metrics").text
    ttl = api.app.state.redis.ttl(f"rq:job:{job['id']}")
    assert 0 < ttl <= api.app.state.settings.result_ttl_s  # its record expires too


def test_an_idempotency_key_whose_job_expired_makes_a_new_job(api):
    a = submit(api, {"Idempotency-Key": "k"}).json()
    api.app.state.redis.delete(f"rq:job:{a['id']}")  # the record expired
    b = submit(api, {"Idempotency-Key": "k"})
    assert b.status_code == 202 and b.json()["id"] != a["id"]


def test_every_job_leaves_an_audit_line(keyed, caplog):
    import hashlib
    import logging

    with caplog.at_level(logging.INFO, logger="magicface.audit"):
        job = submit(keyed, K1, prompt="a man wearing a hat").json()
    line = next(r.getMessage() for r in caplog.records if r.name == "magicface.audit")
    assert f"job={job['id']}" in line and "prompt='a man wearing a hat'" in line
    owner = "k" + hashlib.sha256(b"key-one").hexdigest()[:16]
    assert f"owner={owner}" in line and "key-one" not in line
    assert hashlib.sha256(png()).hexdigest()[:16] in line
