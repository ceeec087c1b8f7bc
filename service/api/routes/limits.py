"""/v1/limits: what this gateway accepts, without a key (the page and clients check a
request before uploading it; nothing in it is secret)."""

from __future__ import annotations

from fastapi import APIRouter

from ...limits import report
from ...schemas import Limits
from ..deps import SettingsDep

router = APIRouter(prefix="/v1")


@router.get("/limits", response_model=Limits, operation_id="get_limits",
            summary="The limits and defaults a job is checked against, as configured")
def get_limits(settings: SettingsDep) -> Limits:
    return report(settings)
