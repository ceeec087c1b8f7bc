"""/v1/masks: a mask proposed for a reference image from the concept word, to preview
(and edit) before submitting a job. `Prefer: wait=N` answers with the mask when it is
ready within N seconds (201), as job submission does; otherwise 202 and
`GET /v1/masks/{id}`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ... import masks
from ...errors import ApiError
from ...queueing import open_queue
from ...schemas import MaskStatus, MaskView
from ...submission import image_source, parse_json_body, parse_prefer_wait
from ...validation import Upload
from .. import openapi
from ..deps import OwnerDep, RedisDep, SettingsDep, current_owner

router = APIRouter(prefix="/v1", dependencies=[Depends(current_owner)],
                   responses=openapi.errors(401))

MASK_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "word"],
        "properties": {"image": {"type": "string", "format": "binary"},
                       "word": {"type": "string", "example": "hat"},
                       "reference_prompt": {"type": "string"}}}},
    "application/json": {"schema": {
        "type": "object", "required": ["image", "word"],
        "properties": {"image": {"type": "string", "description": "a data: URI (or an "
                                 "https URL on INPUT_URL_ALLOWLIST)"},
                       "word": {"type": "string"},
                       "reference_prompt": {"type": "string"}}}}}}}


MASK_FIELDS = frozenset({"image", "word", "reference_prompt"})


async def _request(request: Request, settings) -> masks.MaskRequest:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async with request.form(max_files=1, max_fields=3) as form:
            image = form.get("image")
            upload = (Upload(image.filename, await image.read(settings.max_image_bytes + 1))
                      if image is not None and not isinstance(image, str) else None)
            return masks.mask_request(upload, form.get("word"), form.get("reference_prompt"),
                                      settings)
    if ctype == "application/json":
        body = parse_json_body(await request.body(), MASK_FIELDS)
        image = body.get("image")
        upload = (await run_in_threadpool(image_source, image, "image", settings)
                  if isinstance(image, str) else None)
        return masks.mask_request(upload, body.get("word"), body.get("reference_prompt"),
                                  settings)
    raise ApiError(415, "unsupported_media_type",
                   "Content-Type: use multipart/form-data or application/json")


@router.post("/masks", status_code=202, response_model=MaskView, operation_id="propose_mask",
             summary="Propose a mask of the concept in a reference image",
             openapi_extra=MASK_BODY, responses=openapi.errors(413, 415, 422, 429, 503))
async def propose_mask(
    request: Request, settings: SettingsDep, redis: RedisDep, owner: OwnerDep,
    prefer: Annotated[str | None, Header(description="`wait=N`: answer 201 with the mask "
                                                     "if it is ready within N seconds")] = None,
) -> JSONResponse:
    wait = parse_prefer_wait(prefer, settings)
    queue = open_queue(settings.mask_queue_name, redis)
    await run_in_threadpool(masks.check_room, redis, queue, settings)
    req = await _request(request, settings)
    job = await run_in_threadpool(masks.submit, queue, req, owner, settings)
    view = await run_in_threadpool(masks.wait, job, wait) if wait else masks.view(job)
    done = view.status in (MaskStatus.SUCCEEDED, MaskStatus.FAILED)
    headers = {"Location": f"/v1/masks/{view.id}",
               **({"Preference-Applied": f"wait={wait}"} if wait is not None else {})}
    return JSONResponse(view.model_dump(mode="json"), status_code=201 if done else 202,
                        headers=headers)


@router.get("/masks/{mask_id}", response_model=MaskView, operation_id="get_mask",
            summary="A mask proposal and, once made, the mask", responses=openapi.errors(404))
def get_mask(mask_id: str, redis: RedisDep, owner: OwnerDep) -> MaskView:
    return masks.view(masks.fetch(redis, mask_id, owner))
