"""What the gateway accepts, as configured: the library's one table of limits
(`magicface_core.limits`) with the operator's lower MAX_* settings applied, and the
defaults a request gets (`validation.Params`, which reads the library's). Served as
`GET /v1/limits`, so clients check before uploading."""

from __future__ import annotations

from magicface_core.limits import LIMITS, TEXT_LIMITS
from magicface_core.rules import DEFAULT_PRESET, PRESETS

from .schemas import FieldLimit, ImageLimits, Limits
from .settings import Settings
from .validation import ALLOWED_FORMATS, ConceptSpec, Params

__all__ = ["report"]


def _field(name: str, default=None, most: float | None = None) -> FieldLimit:
    lim = LIMITS[name]
    return FieldLimit(min=lim.low, max=lim.high if most is None else min(lim.high, most),
                      min_exclusive=lim.low_open, multiple_of=lim.multiple_of,
                      default=default)


def report(settings: Settings) -> Limits:
    p = Params.model_fields
    lowered = {"steps": settings.max_steps, "width": settings.max_size,
               "height": settings.max_size}
    params = {name: _field(name, p[name].default, lowered.get(name))
              for name in ("steps", "guidance_scale", "alpha", "seed", "width", "height",
                           "ca_scale")}
    return Limits(
        concepts=_field("concepts", most=settings.max_concepts),
        params=params,
        concept={"weight": _field("weight", ConceptSpec.model_fields["weight"].default)},
        text=dict(TEXT_LIMITS),
        image=ImageLimits(max_pixels=settings.max_image_pixels,
                          max_bytes=settings.max_image_bytes,
                          formats=sorted(ALLOWED_FORMATS.values())),
        presets=list(PRESETS), default_preset=DEFAULT_PRESET,
        max_request_bytes=settings.max_request_bytes, max_wait_s=settings.max_wait_s)
