"""The gateway's job lifecycle, in process on a real Redis: the JSON body beside
multipart (one validation path), deadlines (Cancel-After, QUEUE_TTL_S), listing,
deleting, a full queue, the new inputs' 4xx, the offline docs and the typed OpenAPI."""

from __future__ import annotations

import base64
import json
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.queueing import open_queue
from service.settings import Settings
from service.storage import LocalStorage

from ..helpers.images import png
from ..helpers.multipart import job_form

SECRET = "whsec_" + base64.b64encode(b"a-test-secret-of-32-bytes-length").decode()


@pytest.fixture
def make_api(redis_db, redis_server, tmp_path):
    clients = []

    def make(**overrides) -> TestClient:
        settings = Settings(redis_url=redis_server, storage_url=f"file://{tmp_path}/store",
                            max_image_bytes=200_000, max_request_bytes=500_000,
                            max_image_pixels=1_000_000, **overrides)
        client = TestClient(create_app(settings, storage=LocalStorage(tmp_path / "store")))
        client.__enter__()
        client.queue = open_queue(settings.queue_name, redis_db)
        client.store = tmp_path / "store"
        client.redis = redis_db
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def json_job(**extra) -> dict:
    return {"prompt": "a man wearing a hat",
            "concepts": [{"word": "man", "image": data_uri(png()), "mask": data_uri(png())},
                         {"word": "hat", "weight": 2.0, "image": data_uri(png()),
                          "mask": data_uri(png())}],
            "params": {"steps": 3, "width": 128, "height": 128}, **extra}


def multipart(prompt="a man wearing a hat", params=None, **data):
    form = job_form(prompt, [{"word": "man"}, {"word": "hat", "weight": 2.0}],
                    [png(), png()], [png(), png()],
                    params or {"steps": 3, "width": 128, "height": 128})
    form["data"].update(data)
    return form


def nothing_kept(api) -> bool:
    return api.queue.count == 0 and not any(p.is_file() for p in api.store.rglob("*"))


def rejected(api, r, status, code, field):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and field in err["message"], err
    assert nothing_kept(api)


def test_json_body_is_the_same_request_as_multipart(make_api):
    api = make_api()
    a = api.post("/v1/jobs", json=json_job()).json()
    b = api.post("/v1/jobs", **multipart()).json()
    reqs = [json.loads((api.store / "jobs" / j["id"] / "request.json").read_bytes())
            for j in (a, b)]
    assert reqs[0] == reqs[1]
    for j in (a, b):
        files = sorted(p.name for p in (api.store / "jobs" / j["id"] / "input").iterdir())
        assert files == ["image_0", "image_1", "mask_0", "mask_1"]
    # One Idempotency-Key, either body form: the same job.
    h = {"Idempotency-Key": "same"}
    first = api.post("/v1/jobs", json=json_job(), headers=h).json()["id"]
    assert api.post("/v1/jobs", **multipart(), headers=h).json()["id"] == first


@pytest.mark.parametrize("body,code,field", [
    ({"concepts": []}, "invalid_concepts", "concepts"),
    ({"concepts": [{"word": "man"}]}, "invalid_image", "concepts[0].image"),
    ({"concepts": [{"word": "man", "image": "data:image/png;base64,@@@"}]}, "invalid_image",
     "concepts[0].image"),
    ({"concepts": [{"word": "man", "image": "https://example.com/a.png"}]}, "invalid_image",
     "URL inputs are not enabled"),
    ({"concepts": [{"word": "man", "image": "PNG", "mask": None}], "x": 1}, "invalid_request",
     "x: unknown field"),
    ({"params": {"steps": "many"}}, "invalid_params", "params.steps"),
    ({"concepts": [{"word": "dog", "image": data_uri(png()), "mask": data_uri(png())}]},
     "word_not_in_prompt", "concepts[0].word"),
    ({"concepts": [{"word": "man", "image": data_uri(png()), "mask": data_uri(png())},
                   {"word": "hat", "image": data_uri(png())}]}, "mask_count_mismatch",
     "concepts[1].mask"),
])
def test_json_body_errors_name_the_field(make_api, body, code, field):
    api = make_api()
    rejected(api, api.post("/v1/jobs", json={**json_job(), **body}), 422, code, field)


def test_other_bodies_and_headers_are_refused(make_api):
    api = make_api(webhook_secret=SECRET)
    rejected(api, api.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"}),
             415, "unsupported_media_type", "Content-Type")
    rejected(api, api.post("/v1/jobs", content=b"{", headers={"Content-Type":
                                                            "application/json"}),
             422, "invalid_request", "body")
    rejected(api, api.post("/v1/jobs", **multipart(mask="x")), 422, "invalid_request",
             "mask: unknown field")
    rejected(api, api.post("/v1/jobs", **multipart(), headers={"Prefer": "wait=61"}), 422,
             "invalid_header", "Prefer: wait")
    rejected(api, api.post("/v1/jobs", **multipart(), headers={"Cancel-After": "soon"}), 422,
             "invalid_header", "Cancel-After")
    rejected(api, api.post("/v1/jobs", **multipart(webhook="http://127.0.0.1:9/hook")), 422,
             "invalid_webhook", "private or local address")
    rejected(api, api.post("/v1/jobs", **multipart(webhook="ftp://example.com/")), 422,
             "invalid_webhook", "webhook: the scheme")
    rejected(api, api.post("/v1/jobs", json=json_job(webhook="https://93.184.215.14/h",
                                                     webhook_events=["done"])),
             422, "invalid_webhook", "webhook_events: unknown event 'done'")
    no_secret = make_api()
    rejected(no_secret, no_secret.post("/v1/jobs", **multipart(webhook="https://example.com/")),
             422, "webhooks_disabled", "WEBHOOK_SECRET")


def test_webhook_fields_are_kept_on_the_job(make_api):
    api = make_api(webhook_secret=SECRET, webhook_allow_private=True)
    r = api.post("/v1/jobs", **multipart(webhook="http://127.0.0.1:9/hook",
                                         webhook_events="succeeded, progress"))
    assert r.status_code == 202, r.text
    view = r.json()
    assert view["webhook"] == "http://127.0.0.1:9/hook"
    assert sorted(view["webhook_events"]) == ["progress", "succeeded"]
    # The queued event is not wanted: nothing to deliver yet.
    d = api.get(f"/v1/jobs/{view['id']}/webhook_deliveries").json()
    assert d == {"deliveries": []}
    default = api.post("/v1/jobs", json=json_job(webhook="http://127.0.0.1:9/h")).json()
    assert "progress" not in default["webhook_events"] and "queued" in default["webhook_events"]
    d = api.get(f"/v1/jobs/{default['id']}/webhook_deliveries").json()["deliveries"]
    assert [x["event"] for x in d] == ["queued"] and d[0]["status"] == "pending"
    assert d[0]["id"].startswith(f"msg_{default['id']}_")


def test_deadlines_expire_queued_jobs(make_api):
    api = make_api(queue_ttl_s=1)
    a = api.post("/v1/jobs", **multipart(), headers={"Cancel-After": "1"}).json()
    b = api.post("/v1/jobs", json=json_job()).json()  # only the queue TTL
    assert a["deadline"] is not None
    time.sleep(1.2)
    for j in (a, b):
        view = api.get(f"/v1/jobs/{j['id']}").json()
        assert view["status"] == "expired", view
        assert view["error"]["code"] == "deadline_exceeded" and view["finished_at"]
        img = api.get(f"/v1/jobs/{j['id']}/image")
        assert img.status_code == 410 and img.json()["error"]["code"] == "deadline_exceeded"
    assert api.queue.count == 0
    text = api.get(f"/v1/jobs/{a['id']}/events").text
    assert [line[7:] for line in text.splitlines() if line.startswith("event: ")] == [
        "queued", "expired"]


def test_cancel_after_accepts_durations(make_api):
    api = make_api()
    now = time.time()
    view = api.post("/v1/jobs", **multipart(), headers={"Cancel-After": "1h30m"}).json()
    from datetime import datetime
    deadline = datetime.fromisoformat(view["deadline"].replace("Z", "+00:00")).timestamp()
    assert abs(deadline - (now + 5400)) < 5


def test_queue_full_is_429_with_retry_after(make_api):
    api = make_api(max_queued=2)
    for _ in range(2):
        assert api.post("/v1/jobs", **multipart()).status_code == 202
    r = api.post("/v1/jobs", json=json_job())
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["Retry-After"]) >= 1
    assert api.queue.count == 2


def test_list_is_newest_first_per_owner_with_cursor_and_filter(make_api):
    api = make_api(api_keys="k1,k2")
    one, two = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    ids = [api.post("/v1/jobs", **multipart(), headers=one).json()["id"] for _ in range(3)]
    other = api.post("/v1/jobs", **multipart(), headers=two).json()["id"]
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=one)
    page = api.get("/v1/jobs?limit=2", headers=one).json()
    assert [j["id"] for j in page["jobs"]] == [ids[2], ids[1]] and page["next_cursor"]
    rest = api.get(f"/v1/jobs?limit=2&cursor={page['next_cursor']}", headers=one).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]] and rest["next_cursor"] is None
    canceled = api.get("/v1/jobs?status=canceled", headers=one).json()["jobs"]
    assert [j["id"] for j in canceled] == [ids[0]]
    assert [j["id"] for j in api.get("/v1/jobs", headers=two).json()["jobs"]] == [other]
    r = api.get("/v1/jobs?cursor=abc", headers=one)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_cursor"


def test_delete_removes_record_objects_and_queue_entry(make_api):
    api = make_api()
    keep = api.post("/v1/jobs", **multipart()).json()["id"]
    gone = api.post("/v1/jobs", json=json_job()).json()["id"]
    assert (api.store / "jobs" / gone).exists()
    assert api.delete(f"/v1/jobs/{gone}").status_code == 204
    assert api.get(f"/v1/jobs/{gone}").status_code == 404
    assert api.delete(f"/v1/jobs/{gone}").status_code == 404
    assert not (api.store / "jobs" / gone).exists() and (api.store / "jobs" / keep).exists()
    assert api.queue.job_ids == [keep]
    assert not api.redis.exists(f"magicface:events:{gone}")
    assert [j["id"] for j in api.get("/v1/jobs").json()["jobs"]] == [keep]


def test_the_next_job_is_position_zero_and_has_a_queue_eta(make_api):
    api = make_api()
    api.redis.hset("magicface:metrics:duration", mapping={"count": 4, "sum": 8.0})
    a = api.post("/v1/jobs", **multipart()).json()
    b = api.post("/v1/jobs", **multipart()).json()
    assert a["queue_position"] == 0 and b["queue_position"] == 1
    assert a["eta_s"] == 2.0 and b["eta_s"] == 4.0  # one worker assumed, 2 s a job
    assert a["reproducibility"]["input_sha256"] and a["result"] is None


def test_docs_are_served_without_a_cdn(make_api):
    api = make_api()
    for page, asset in (("/docs", "/docs-assets/swagger-ui-bundle.js"),
                        ("/redoc", "/docs-assets/redoc.standalone.js")):
        html = api.get(page).text
        assert asset in html and "cdn" not in html.lower() and "googleapis" not in html
        r = api.get(asset)
        assert r.status_code == 200 and len(r.content) > 100_000


def test_openapi_types_uploads_and_errors_for_generators(make_api):
    doc = make_api().get("/openapi.json").json()
    create = doc["paths"]["/v1/jobs"]["post"]
    body = create["requestBody"]["content"]
    images = body["multipart/form-data"]["schema"]["properties"]["images"]
    assert images == {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": images["description"]}
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert {"JobCreate", "ConceptSpec", "Params", "JobView"} <= set(doc["components"]["schemas"])
    assert create["operationId"] == "create_job"
    assert "Location" in create["responses"]["202"]["headers"]
    assert "queue_full" in create["responses"]["429"]["description"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    view = doc["components"]["schemas"]["JobView"]["properties"]
    assert {"type": "string", "format": "date-time"} in view["created_at"]["anyOf"]
    ops = {op["operationId"] for p in doc["paths"].values() for op in p.values()}
    assert {"list_jobs", "get_job", "delete_job", "cancel_job", "job_events", "get_image",
            "redeliver_webhook"} <= ops
    assert "HTTPValidationError" not in json.dumps(doc)


def test_readiness_and_metrics_count_this_queues_workers_and_submissions(make_api):
    api = make_api(queue_name="faces")
    from service.workers import register

    register(api.redis, "other", "other", {"model_loaded": True}, 60)
    r = api.get("/readyz")
    assert r.status_code == 503 and "'faces'" in r.json()["error"]["message"]
    register(api.redis, "faces", "mine", {"model_loaded": True}, 60)
    assert api.get("/readyz").json() == {"status": "ready", "workers": 1, "warming": 0}
    ids = [api.post("/v1/jobs", **multipart()).json()["id"] for _ in range(2)]
    assert api.post(f"/v1/jobs/{ids[0]}/cancel").json()["status"] == "canceled"
    text = api.get("/metrics").text
    assert "magicface_workers 1.0" in text
    assert "magicface_jobs_submitted_total 2.0" in text
    assert 'magicface_jobs_ended_while_queued_total{state="canceled"} 1.0' in text
    assert 'magicface_jobs_ended_total{status="canceled"} 1.0' in text
    assert 'magicface_jobs{status="queued"} 1.0' in text


def test_webhook_secrets_are_standard_webhooks_secrets():
    """whsec_ + base64, padding optional; anything else is refused at start-up with
    the way to make one."""
    from pydantic import ValidationError

    key = b"k" * 32
    padded = "whsec_" + base64.b64encode(key).decode()
    assert Settings(webhook_secret=padded).webhook_secrets == [key]
    assert Settings(webhook_secret=padded.rstrip("=")).webhook_secrets == [key]
    for bad in ("s3cret", "whsec_@@@", "whsec_" + base64.b64encode(b"short").decode(),
                f"{padded},plain"):
        with pytest.raises(ValidationError, match="WEBHOOK_SECRET.*magicface secret"):
            Settings(webhook_secret=bad)


def test_a_bare_prefer_wait_waits_max_wait_s():
    from service.submission import parse_prefer_wait

    settings = Settings(max_wait_s=45)
    for header, wanted in (("wait", 45), ("respond-async, wait", 45), ("Wait ; x=1", 45),
                           ("wait=5", 5), ('wait="7"', 7), ("waiting=3", None),
                           ("return=minimal", None), (None, None)):
        assert parse_prefer_wait(header, settings) == wanted, header


def test_numbers_are_json_numbers_not_bools_or_strings(make_api):
    """No coercion: `true` is not 1, `"4"` is not 4, 1.0 is not a whole number of steps;
    in both bodies, naming the field."""
    api = make_api()
    for params, field in (({"steps": True}, "params.steps"), ({"steps": "4"}, "params.steps"),
                          ({"seed": 1.5}, "params.seed"), ({"width": "128"}, "params.width"),
                          ({"guidance_scale": False}, "params.guidance_scale")):
        rejected(api, api.post("/v1/jobs", **multipart(params=params)), 422, "invalid_params",
                 field)
        rejected(api, api.post("/v1/jobs", json=json_job(params=params)), 422,
                 "invalid_params", field)
    for weight in (True, "2"):
        body = json_job()
        body["concepts"][1]["weight"] = weight
        rejected(api, api.post("/v1/jobs", json=body), 422, "invalid_concepts",
                 "concepts[1].weight")
    # Whole numbers still go where floats are asked for.
    assert api.post("/v1/jobs", json=json_job(params={"steps": 3, "width": 128, "height": 128,
                                                      "guidance_scale": 7})).status_code == 202


def test_oversized_headers_are_431_naming_the_limit(make_api):
    api = make_api(max_header_bytes=8192)
    r = api.get("/healthz", headers={"X-Big": "a" * 10_000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert "MAX_HEADER_BYTES" in r.json()["error"]["message"]
    assert api.get("/healthz", headers={"X-Fine": "a" * 4000}).status_code == 200


def test_metrics_are_gauges_or_total_counters_with_max_rules(make_api):
    """Current states are gauges, events `_total` counters; each exported family has a
    max() recording rule (replicas export the same cluster-wide values)."""
    import re
    from pathlib import Path

    import yaml

    api = make_api()
    text = api.get("/metrics").text
    types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M))
    assert types["magicface_jobs"] == "gauge" and types["magicface_queue_depth"] == "gauge"
    counters = [name for name, kind in types.items() if kind == "counter"]
    assert len(counters) >= 6 and all(name.endswith("_total") for name in counters), types
    assert not re.search(r'^magicface_jobs\{status="(succeeded|failed)"', text, re.M)
    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" /
                            "prometheus-rules.yaml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    assert "sum(" not in exprs and "sum without" not in exprs
    for name in types:
        assert name in exprs, f"no recording rule reads {name}"
