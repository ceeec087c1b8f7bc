"""Hostile values, field by field (hypothesis): every body field, header and query of the
gateway gets nesting, huge and non-finite numbers, wrong types, control characters and
long strings. The answer is never a 5xx; an error is always the envelope, and a refused
field is named in its message. (test_schemathesis.py walks the OpenAPI document too.)"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.images import png
from ..helpers.multipart import job_form
from .test_lifecycle import data_uri

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_control = st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=8)
_numbers = st.one_of(st.integers(min_value=-(10**30), max_value=10**30),
                     st.just(10**400), st.floats(allow_nan=True, allow_infinity=True),
                     st.booleans())
_leaf = st.one_of(st.none(), _numbers, _text, _control)
HOSTILE = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(_text, inner,
                                                                      max_size=3)),
                       max_leaves=6)
PARAMS = ["steps", "guidance_scale", "alpha", "seed", "negative_prompt", "width", "height",
          "preset", "ca_scale"]
CONCEPT_FIELDS = ["word", "weight", "reference_prompt"]


def _dumps(value) -> str:
    # Python's json writes NaN/Infinity and 10**400 as-is: what a hostile client sends.
    return json.dumps(value, allow_nan=True)


def check(r, field: str | None = None) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str), err
        if field is not None and r.status_code == 422:
            assert field in err["message"] or err["code"] in ("invalid_request",
                                                               "invalid_header"), err


def _job(**over) -> dict:
    body = {"prompt": "a man wearing a hat",
            "concepts": [{"word": "man", "image": data_uri(png()), "mask": data_uri(png())},
                         {"word": "hat", "image": data_uri(png()), "mask": data_uri(png())}],
            "params": {"steps": 2, "width": 64, "height": 64}}
    body.update(over)
    return body


@pytest.fixture
def fuzz_api(api):
    return api


def test_hostile_params_in_both_bodies(fuzz_api):
    @FUZZ
    @given(name=st.sampled_from(PARAMS), value=HOSTILE)
    def run(name, value):
        params = {"steps": 2, "width": 64, "height": 64, name: value}
        check(fuzz_api.post("/v1/jobs", content=_dumps(_job(params=params)),
                            headers={"Content-Type": "application/json"}), f"params.{name}")
        form = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}],
                        [png(), png()], [png(), png()], _dumps(params))
        check(fuzz_api.post("/v1/jobs", **form), f"params.{name}")

    run()


def test_hostile_concept_fields_and_top_level_values(fuzz_api):
    @FUZZ
    @given(name=st.sampled_from(CONCEPT_FIELDS), value=HOSTILE,
           top=st.sampled_from(["prompt", "concepts", "params", "webhook", "webhook_events"]),
           top_value=HOSTILE)
    def run(name, value, top, top_value):
        body = _job()
        body["concepts"][1][name] = value
        check(fuzz_api.post("/v1/jobs", content=_dumps(body),
                            headers={"Content-Type": "application/json"}), f"concepts[1].{name}")
        check(fuzz_api.post("/v1/jobs", content=_dumps(_job(**{top: top_value})),
                            headers={"Content-Type": "application/json"}), top)
        form = job_form("a man wearing a hat", _dumps([{"word": "man"}, {"word": "hat",
                                                                          name: value}]),
                        [png(), png()], [png(), png()])
        check(fuzz_api.post("/v1/jobs", **form), "concepts")

    run()


def test_hostile_headers_and_queries(fuzz_api):
    header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                           max_size=300)

    @FUZZ
    @given(header=st.sampled_from(["Idempotency-Key", "Prefer", "Cancel-After",
                                   "Authorization", "Last-Event-ID", "X-Request-ID",
                                   "Content-Type"]),
           value=header_value, query=st.sampled_from(["limit", "status", "cursor"]),
           query_value=st.one_of(_text, st.integers().map(str), st.just("9" * 400)))
    def run(header, value, query, query_value):
        form = job_form("a man wearing a hat", [{"word": "man"}, {"word": "hat"}],
                        [png(), png()], [png(), png()], {"steps": 2, "width": 64,
                                                         "height": 64})
        if header == "Content-Type":
            check(fuzz_api.post("/v1/jobs", content=b"{}", headers={header: value}))
        else:
            check(fuzz_api.post("/v1/jobs", **form, headers={header: value}))
        check(fuzz_api.get("/v1/jobs", params={query: query_value}), query)
        check(fuzz_api.get(f"/v1/jobs/{quote(query_value[:80], safe='')}",
                           headers={header: value}))
        check(fuzz_api.get("/v1/jobs/0123456789abcdef0123456789abcdef/events",
                           headers={"Last-Event-ID": value}))

    run()


def test_hostile_mask_proposal_fields(fuzz_api, redis_db):
    from service.settings import Settings
    from service.workers import register

    # A worker that proposes masks, so each request reaches validation.
    register(redis_db, Settings().queue_name, "fuzz-masker",
             {"model_loaded": True, "masks": True}, 600)

    @FUZZ
    @given(name=st.sampled_from(["image", "word", "reference_prompt"]), value=HOSTILE)
    def run(name, value):
        body = {"image": data_uri(png()), "word": "hat", name: value}
        check(fuzz_api.post("/v1/masks", content=_dumps(body),
                            headers={"Content-Type": "application/json"}), name)
        if isinstance(value, str) and name != "image":
            form = {"word": "hat", name: value}
            check(fuzz_api.post("/v1/masks", data=form,
                                files={"image": ("a.png", png(), "image/png")}), name)

    run()
