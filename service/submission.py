"""A job submission in either body form, multipart (files) or JSON (typed objects with
`data:` URIs or https URLs), reduced to the same fields for the one validation path
(`validation.validate_request`); and the submission headers (`Prefer: wait`,
`Cancel-After`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from magicface_core.limits import TEXT_LIMITS
from magicface_core.rules import concept_problems, count_problem, prompt_problems

from .errors import ApiError
from .remote import AddressRefused, FetchError, check_url, decode_data_uri, fetch_url
from .schemas import EventType
from .settings import Settings
from .validation import ConceptSpec, Params, Upload, refuse
from .webhooks import parse_events

__all__ = ["Submission", "from_multipart", "from_json", "parse_prefer_wait",
           "parse_cancel_after", "JobCreate", "JsonConcept", "MULTIPART_FIELDS"]

MULTIPART_FIELDS = {"prompt", "concepts", "params", "images", "masks", "webhook",
                    "webhook_events"}


@dataclass
class Submission:
    prompt: Any
    concepts: Any  # a JSON string (multipart) or a list of objects (JSON)
    params: Any
    images: list[Upload] = field(default_factory=list)
    masks: list[Upload] = field(default_factory=list)
    webhook: str | None = None
    webhook_events: frozenset[EventType] | None = None


# -- the JSON body's schema (OpenAPI; parsing below gives field-named errors) ------------
class JsonConcept(ConceptSpec):
    image: str = Field(description="the reference: a data: URI (base64) or an https URL "
                                   "on an allowed host")
    mask: str | None = Field(None, description="white = the concept; same size as image")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=TEXT_LIMITS["prompt"])
    concepts: list[JsonConcept]
    params: Params | None = None
    webhook: str | None = Field(None, description="URL to POST signed job events to")
    webhook_events: list[EventType] | None = Field(
        None, description="events to send (default: all but progress)")


def _webhook(url: Any, events_raw: Any, settings: Settings
             ) -> tuple[str | None, frozenset[EventType] | None]:
    if url is None or url == "":
        if events_raw not in (None, "", []):
            raise ApiError(422, "invalid_webhook", "webhook_events: given without webhook")
        return None, None
    if not isinstance(url, str) or len(url) > 2000:
        raise ApiError(422, "invalid_webhook", "webhook: must be a URL of at most 2000 "
                                               "characters")
    if not settings.webhook_secrets:
        raise ApiError(422, "webhooks_disabled",
                       "webhook: webhooks are not enabled on this server (WEBHOOK_SECRET "
                       "is unset)")
    try:
        check_url(url, schemes=("https", "http"), allow_private=settings.webhook_allow_private)
    except AddressRefused as e:
        raise ApiError(422, "invalid_webhook", f"webhook: {e}") from None
    try:
        wanted = parse_events(events_raw)
    except ValueError as e:
        raise ApiError(422, "invalid_webhook", f"webhook_events: {e}") from None
    return url, wanted


async def from_multipart(request, settings: Settings) -> Submission:
    form = await request.form(max_files=2 * settings.max_concepts + 2, max_fields=20)
    try:
        unknown = sorted(set(form.keys()) - MULTIPART_FIELDS)
        if unknown:
            raise ApiError(422, "invalid_request",
                           f"{unknown[0]}: unknown field (fields: "
                           f"{', '.join(sorted(MULTIPART_FIELDS))})")

        def text(name: str, required: bool = False) -> str | None:
            values = form.getlist(name)
            if not values:
                if required:
                    raise ApiError(422, "invalid_request", f"{name}: field required")
                return None
            if len(values) > 1 or not isinstance(values[0], str):
                raise ApiError(422, "invalid_request", f"{name}: must be one text field")
            return values[0]

        async def files(name: str) -> list[Upload]:
            out = []
            for v in form.getlist(name):
                if isinstance(v, str):
                    raise ApiError(422, "invalid_request", f"{name}: must be files")
                out.append(Upload(v.filename, await v.read(settings.max_image_bytes + 1)))
            return out

        prompt = text("prompt", required=True)
        concepts = text("concepts", required=True)
        images = await files("images")
        if not images:
            raise ApiError(422, "invalid_request", "images: field required")
        masks = await files("masks")
        webhook, wanted = _webhook(text("webhook"), text("webhook_events"), settings)
        return Submission(prompt, concepts, text("params"), images, masks, webhook, wanted)
    finally:
        await form.close()


def parse_json_body(raw: bytes, fields: frozenset[str] | None = None) -> dict:
    """The body as a JSON object with only `fields` (default: a job's)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(422, "invalid_request", f"body: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "body: must be a JSON object")
    unknown = sorted(set(body) - (set(JobCreate.model_fields) if fields is None else fields))
    if unknown:
        raise ApiError(422, "invalid_request", f"{unknown[0]}: unknown field")
    return body


def from_json(body: dict, settings: Settings) -> Submission:
    """The JSON body's fields; images and masks fetched (data: URIs decoded, https
    URLs downloaded within the limits). Blocking (downloads): call off the event loop."""
    if "prompt" not in body:
        raise ApiError(422, "invalid_prompt", "prompt: field required")
    concepts = body.get("concepts")
    if not isinstance(concepts, list):
        raise ApiError(422, "invalid_concepts", "concepts: must be a list of objects")
    refuse(count_problem(len(concepts), most=settings.max_concepts))
    specs, sources = [], []
    for i, c in enumerate(concepts):
        if not isinstance(c, dict):
            raise ApiError(422, "invalid_concepts", f"concepts[{i}]: must be an object")
        c = dict(c)
        image, mask = c.pop("image", None), c.pop("mask", None)
        if not isinstance(image, str) or not image:
            raise ApiError(422, "invalid_image", f"concepts[{i}].image: required (a data: "
                                                 "URI or an https URL)")
        specs.append(c)
        sources.append((image, mask))
    # The rule book before any download: a misspelt word must not cost a fetch.
    refuse(*prompt_problems(body["prompt"]))
    refuse(*concept_problems(body["prompt"], specs, most=settings.max_concepts))
    images, masks = [], []
    for i, (image, mask) in enumerate(sources):
        images.append(image_source(image, f"concepts[{i}].image", settings))
        if mask is not None:
            masks.append((i, image_source(mask, f"concepts[{i}].mask", settings)))
    if masks and len(masks) != len(concepts):
        missing = next(i for i in range(len(concepts)) if i not in dict(masks))
        raise ApiError(422, "mask_count_mismatch",
                       f"concepts[{missing}].mask: give a mask for every concept or none")
    webhook, wanted = _webhook(body.get("webhook"), body.get("webhook_events"), settings)
    return Submission(body["prompt"], specs, body.get("params"), images,
                      [m for _, m in masks], webhook, wanted)


def image_source(value: str, where: str, settings: Settings) -> Upload:
    """An image sent as a data: URI, or an https URL on INPUT_URL_ALLOWLIST fetched."""
    try:
        if value.startswith("data:"):
            return Upload(None, decode_data_uri(value, settings.max_image_bytes))
        if not settings.input_url_hosts:
            raise ApiError(422, "invalid_image", f"{where}: URL inputs are not enabled on "
                                                 "this server; send a data: URI")
        data = fetch_url(value, max_bytes=settings.max_image_bytes,
                         timeout_s=settings.input_url_timeout_s,
                         allow_private=settings.input_url_allow_private,
                         hosts=settings.input_url_hosts)
        return Upload(value.rsplit("/", 1)[-1][:100], data)
    except (AddressRefused, FetchError) as e:
        raise ApiError(422, "invalid_image", f"{where}: {e}") from None


# -- headers --------------------------------------------------------------------------
_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*\"?([^\s,;\"]*)\"?)?(?=$|[,;\s])",
                   re.IGNORECASE)


def parse_prefer_wait(header: str | None, settings: Settings) -> int | None:
    """`Prefer: wait=N` (RFC 7240): seconds to hold the answer for the job to finish.
    A bare `Prefer: wait` waits MAX_WAIT_S (as Replicate's API does)."""
    if not header:
        return None
    m = _WAIT.search(header)
    if m is None:
        return None  # other preferences: ignored, as RFC 7240 asks
    value = m.group(1)
    if value is None:
        return settings.max_wait_s
    if not value.isdigit() or int(value) > settings.max_wait_s:
        raise ApiError(422, "invalid_header",
                       f"Prefer: wait must be a whole number of seconds from 0 to "
                       f"{settings.max_wait_s}, got {value!r}")
    return int(value)


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_cancel_after(header: str | None) -> float | None:
    """`Cancel-After`: seconds (`90`) or a duration (`1h30m`, `5m`, `45s`) from
    submission; a job unfinished by then expires."""
    if header is None:
        return None
    value = header.strip().lower()
    seconds = None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif value and (m := _DURATION.fullmatch(value)) and any(m.groups()):
        h, mi, s = m.groups()
        seconds = int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)
    if seconds is None or not 1 <= seconds <= 7 * 86400:
        raise ApiError(422, "invalid_header",
                       "Cancel-After: a duration from 1 s to 7 days, as seconds (90) or "
                       f"like 1h30m, 5m, 45s; got {header[:50]!r}")
    return seconds
