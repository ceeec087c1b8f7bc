"""What the OpenAPI document says beyond the routes' signatures: the two request
bodies of POST /v1/jobs (files as `format: binary`, so generators type them as
files), the error codes each status carries, examples, the Location header."""

from __future__ import annotations

from typing import Any

from ..schemas import ErrorBody
from ..submission import JobCreate
from ..validation import ConceptSpec, Params

__all__ = ["errors", "CREATED", "SSE", "PNG", "CREATE_JOB_BODY", "ERROR_CODES",
           "EXTRA_SCHEMAS", "JOB_EXAMPLE"]

# The `error.code` values each status may carry.
ERROR_CODES: dict[int, list[str]] = {
    401: ["unauthorized"],
    404: ["not_found"],
    409: ["not_ready", "job_finished"],
    410: ["canceled", "deadline_exceeded", "the failed job's error.code (e.g. "
          "invalid_input, out_of_memory, worker_lost)"],
    413: ["request_too_large", "file_too_large", "image_too_large"],
    415: ["unsupported_media_type"],
    422: ["invalid_request", "invalid_prompt", "invalid_concepts", "invalid_params",
          "invalid_image", "word_not_in_prompt", "image_count_mismatch",
          "mask_count_mismatch", "mask_size_mismatch", "masks_required", "invalid_webhook",
          "webhooks_disabled", "invalid_header", "idempotency_conflict", "invalid_cursor"],
    429: ["queue_full (with Retry-After)", "key_queue_full (with Retry-After)"],
    503: ["unavailable", "redis_unavailable", "storage_unavailable", "no_worker",
          "warming_up", "no_mask_worker"],
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"model": ErrorBody,
                  "description": "`error.code`: " + ", ".join(ERROR_CODES[s])}
        if s == 429:
            out[s]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                 "description": "seconds"}}
    return out


JOB_EXAMPLE = {
    "id": "3f2a9c0d8e7b4a6f9c1d2e3f4a5b6c7d", "status": "running",
    "progress": {"step": 12, "total": 50, "percent": 24.0, "eta_s": 7.6, "stage": "rsa"},
    "queue_position": None, "eta_s": 7.6, "created_at": "2026-11-26T10:00:00Z",
    "started_at": "2026-11-26T10:00:01Z", "finished_at": None, "deadline": None,
    "error": None, "result": None, "cache": None,
}

LOCATION = {"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"}}
CREATED = {
    201: {"model": None, "description": "finished within `Prefer: wait` (the job view)",
          "headers": {**LOCATION, "Preference-Applied": {"schema": {"type": "string"}}},
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobView"}}}},
    202: {"description": "accepted and queued (the job view)", "headers": LOCATION,
          "content": {"application/json": {"example": {**JOB_EXAMPLE, "status": "queued",
                                                       "queue_position": 0}}}},
}
SSE = {200: {"description": "`event:` queued, started, progress, succeeded, failed, "
                            "canceled or expired; `id:` the event id (send it back as "
                            "Last-Event-ID to resume); `data:` JSON, for progress "
                            "{step, total, percent, eta_s, stage}, else the job view. The "
                            "stream ends after the terminal event.",
             "content": {"text/event-stream": {"schema": {"type": "string"},
                                               "example": "id: 1764151201000-0\n"
                                                          "event: progress\ndata: {\"step\":"
                                                          " 12, \"total\": 50, \"percent\": "
                                                          "24.0, \"eta_s\": 7.6, \"stage\": "
                                                          "\"rsa\"}\n\n"}}}}
PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
             "description": "the PNG"},
       307: {"description": "redirect to a presigned storage URL (S3_PUBLIC_URL set)",
             "headers": {"Location": {"schema": {"type": "string"}}}}}

_CONCEPTS_EXAMPLE = '[{"word": "man", "weight": 3.0}]'
_MULTIPART = {
    "type": "object",
    "required": ["prompt", "concepts", "images"],
    "properties": {
        "prompt": {"type": "string", "maxLength": 1000, "description": "the target prompt",
                   "example": "a photo of a man"},
        "concepts": {"type": "string", "description": "JSON: a list of ConceptSpec, one "
                                                      "per image", "example": _CONCEPTS_EXAMPLE},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "one reference image per concept (PNG, JPEG, WebP)"},
        "masks": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "none, or one mask per concept (white = the concept)"},
        "params": {"type": "string", "description": "JSON: Params",
                   "example": '{"steps": 50, "seed": 1}'},
        "webhook": {"type": "string", "description": "URL to POST signed job events to"},
        "webhook_events": {"type": "string", "description": "comma-separated events "
                                                            "(default: all but progress)"},
    },
}
CREATE_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART,
                                    "encoding": {"images": {"contentType": "image/*"},
                                                 "masks": {"contentType": "image/*"}}},
            "application/json": {
                "schema": {"$ref": "#/components/schemas/JobCreate"},
                "example": {"prompt": "a photo of a man",
                            "concepts": [{"word": "man", "image": "data:image/png;base64,...",
                                          "mask": "data:image/png;base64,..."}],
                            "params": {"steps": 50, "seed": 1}}},
        },
    },
}
# Models only the hand-written bodies name: added to components.schemas.
EXTRA_SCHEMAS = (JobCreate, ConceptSpec, Params)
