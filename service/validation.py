"""Validating a generation request before anything is stored or queued.

Pure functions over bytes and strings: no torch, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from magicface_core.config import GenerationConfig
from magicface_core.limits import LIMITS, TEXT_LIMITS
from magicface_core.rules import (
    DEFAULT_PRESET,
    DEFAULT_WEIGHT,
    PRESETS,
    Problem,
    concept_problems,
    count_problem,
    prompt_problems,
)

from .errors import ApiError
from .settings import Settings

EXIF_ORIENTATION = 0x0112
ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def _range(name: str) -> dict:
    """Pydantic bounds from the library's one table of limits (magicface_core.limits)."""
    lim = LIMITS[name]
    low = {"gt": lim.low} if lim.low_open else {"ge": lim.low}
    extra = {"multiple_of": lim.multiple_of} if lim.multiple_of else {}
    return {**low, "le": lim.high, **extra}


# strict: JSON's own types only. `true` is not 1 and `"4"` is not 4: a client sending
# either has a bug that coercion would hide.
class ConceptSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    word: str = Field(min_length=1, max_length=TEXT_LIMITS["word"])
    weight: float = Field(default=DEFAULT_WEIGHT, allow_inf_nan=False, **_range("weight"))
    reference_prompt: str | None = Field(default=None,
                                         max_length=TEXT_LIMITS["reference_prompt"])


# A request's defaults are the library's (one set: the CLI's are too).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    steps: int = Field(default=_DEFAULTS["steps"], **_range("steps"))
    guidance_scale: float = Field(default=_DEFAULTS["guidance_scale"], allow_inf_nan=False,
                                  **_range("guidance_scale"))
    alpha: float = Field(default=_DEFAULTS["alpha"], allow_inf_nan=False, **_range("alpha"))
    seed: int = Field(default=_DEFAULTS["seed"], **_range("seed"))
    # None: the preset's (the authors' negative prompt under "authors", "" under "paper").
    negative_prompt: str | None = Field(default=None,
                                        max_length=TEXT_LIMITS["negative_prompt"])
    width: int = Field(default=_DEFAULTS["width"], **_range("width"))
    height: int = Field(default=_DEFAULTS["height"], **_range("height"))
    # "authors" reproduces the code that made the published images; "paper" is the
    # paper's equations alone.
    preset: Literal[PRESETS] = DEFAULT_PRESET  # type: ignore[valid-type]
    # Non-concept tokens' weight in the semantic map; None: the preset's (authors: 0.9
    # for one concept, 0.6 for several; paper: 1).
    ca_scale: float | None = Field(default=None, allow_inf_nan=False, **_range("ca_scale"))

    def to_config(self, **extra) -> GenerationConfig:
        """The library config of these parameters (the worker adds its own settings,
        such as reference_seed, through `extra`). Raises MagicFaceInputError (a
        ValueError) on what only the library checks."""
        return GenerationConfig(steps=self.steps, guidance_scale=self.guidance_scale,
                                alpha=self.alpha, seed=self.seed,
                                negative_prompt=self.negative_prompt, width=self.width,
                                height=self.height, preset=self.preset,
                                ca_scale=self.ca_scale, **extra)


@dataclass
class Upload:
    filename: str | None
    data: bytes


@dataclass
class ValidImage:
    data: bytes
    content_type: str
    size: tuple[int, int]


@dataclass
class JobRequest:
    prompt: str
    concepts: list[ConceptSpec]
    images: list[ValidImage]
    masks: list[ValidImage]
    params: Params

    def batch_key(self) -> str:
        """Jobs a worker may sample together share this key: the parameters that fix a
        call's shape (prompts, seeds, guidance scales above 1, negative prompts,
        references and weights may differ). The library checks the exact shape again
        and runs apart what does not match."""
        p = self.params
        shape = [p.steps, p.width, p.height, p.alpha, p.preset, len(self.concepts),
                 p.guidance_scale > 1.0]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    def record(self) -> dict:
        """What the worker reads back (request.json)."""
        return {
            "prompt": self.prompt,
            "concepts": [c.model_dump() for c in self.concepts],
            "params": self.params.model_dump(),
            "masks": bool(self.masks),
        }


def _pydantic_message(field: str, e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    where = f"{field}.{loc}" if loc else field
    return f"{where}: {err.get('msg', 'invalid')}"


def _load_json(raw: str, field: str, code: str, kind: type, expected: str):
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(422, code, f"{field}: not valid JSON ({e.msg})") from None
    if not isinstance(data, kind):
        raise ApiError(422, code, f"{field}: must be {expected}")
    return data


def parse_concepts(raw: str | list, settings: Settings,
                   prompt: str | None = None) -> list[ConceptSpec]:
    """`concepts` as a JSON string (multipart) or a decoded list (JSON body). The rule
    book judges the words, weights and reference prompts (against `prompt` when given)
    before the schema does, so the API says what the library and the CLI say."""
    data = (_load_json(raw, "concepts", "invalid_concepts", list, "a JSON list of objects")
            if isinstance(raw, str) else raw)
    if not isinstance(data, list):
        raise ApiError(422, "invalid_concepts", "concepts: must be a list of objects")
    refuse(count_problem(len(data), most=settings.max_concepts))
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ApiError(422, "invalid_concepts", f"concepts[{i}]: must be an object")
    refuse(*concept_problems(prompt, data, most=settings.max_concepts))
    out = []
    for i, item in enumerate(data):
        try:
            out.append(ConceptSpec.model_validate(item))
        except ValidationError as e:
            raise ApiError(422, "invalid_concepts", _pydantic_message(f"concepts[{i}]", e)) \
                from None
    return out


def parse_params(raw: str | dict | None, settings: Settings) -> Params:
    """`params` as a JSON string (multipart), a decoded object (JSON body) or absent."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        data = {}
    elif isinstance(raw, str):
        data = _load_json(raw, "params", "invalid_params", dict, "a JSON object")
    elif isinstance(raw, dict):
        data = raw
    else:
        raise ApiError(422, "invalid_params", "params: must be an object")
    try:
        p = Params.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, "invalid_params", _pydantic_message("params", e)) from None
    if p.steps > settings.max_steps:
        raise ApiError(422, "invalid_params",
                       f"params.steps: at most {settings.max_steps}, got {p.steps}")
    for name in ("width", "height"):
        v = getattr(p, name)
        if v > settings.max_size:
            raise ApiError(422, "invalid_params",
                           f"params.{name}: at most {settings.max_size}, got {v}")
    # The library's own checks (multiples of 8, ranges) are the source of truth.
    try:
        p.to_config()
    except ValueError as e:
        raise ApiError(422, "invalid_params", f"params.{e}") from None
    return p


def _plain(message: str) -> str:
    """A decoder's message without object reprs (they carry heap addresses)."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the upload", message)


def decode_image(upload: Upload, field: str, settings: Settings) -> ValidImage:
    if len(upload.data) > settings.max_image_bytes:
        raise ApiError(413, "file_too_large",
                       f"{field}: {len(upload.data)} bytes exceeds the "
                       f"{settings.max_image_bytes}-byte limit")
    if not upload.data:
        raise ApiError(422, "invalid_image", f"{field}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(upload.data))
            fmt = img.format
            w, h = img.size
            if w * h > settings.max_image_pixels:
                raise ApiError(413, "image_too_large",
                               f"{field}: {w}x{h} exceeds the {settings.max_image_pixels}"
                               "-pixel limit")
            if fmt not in ALLOWED_FORMATS:
                raise ApiError(422, "invalid_image",
                               f"{field}: format {fmt} is not one of PNG, JPEG, WebP")
            img.load()
            # The size as displayed: a photo's EXIF orientation may turn it (the
            # library applies the same turn when it decodes the upload).
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(422, "invalid_image",
                       f"{field}: not a decodable PNG, JPEG or WebP image "
                       f"({_plain(str(e))})") from None
    return ValidImage(upload.data, ALLOWED_FORMATS[fmt], (w, h))


def refuse(*problems: Problem | None) -> None:
    """The rule book's first problem (None: none) as the API's 422 (its code names the
    kind)."""
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise ApiError(422, first.code, first.text())


def validate_request(prompt: str, concepts_raw: str | list, images: list[Upload],
                     masks: list[Upload], params_raw: str | dict | None,
                     settings: Settings, auto_masks: bool = False) -> JobRequest:
    """The one validation path of both request bodies (multipart and JSON).
    `auto_masks`: a live worker proposes masks, so a job may come without them."""
    total = sum(len(u.data) for u in images + masks)
    if total > settings.max_request_bytes:
        raise ApiError(413, "request_too_large",
                       f"uploads total {total} bytes, over the {settings.max_request_bytes}"
                       "-byte limit")
    refuse(*prompt_problems(prompt))
    concepts = parse_concepts(concepts_raw, settings, prompt)
    if len(images) != len(concepts):
        raise ApiError(422, "image_count_mismatch",
                       f"images: {len(images)} uploaded for {len(concepts)} concepts")
    if masks and len(masks) != len(concepts):
        raise ApiError(422, "mask_count_mismatch",
                       f"masks: {len(masks)} uploaded for {len(concepts)} concepts "
                       "(send none or one per concept)")
    params = parse_params(params_raw, settings)
    valid_images = [decode_image(u, f"images[{i}]", settings) for i, u in enumerate(images)]
    # After the images: a missing mask must not hide what is wrong with them.
    if not masks and not (auto_masks or settings.sam_checkpoint):
        raise ApiError(422, "masks_required",
                       "masks: one per concept is required (no worker proposes masks: "
                       "MASK_DETECTOR and MASK_FACES are unset, as is SAM_CHECKPOINT)")
    valid_masks = [decode_image(u, f"masks[{i}]", settings) for i, u in enumerate(masks)]
    for i, (img, m) in enumerate(zip(valid_images, valid_masks, strict=False)):
        if img.size != m.size:
            raise ApiError(422, "mask_size_mismatch",
                           f"masks[{i}]: {m.size[0]}x{m.size[1]} but images[{i}] is "
                           f"{img.size[0]}x{img.size[1]}")
    return JobRequest(prompt, concepts, valid_images, valid_masks, params)


def body_hash(req: JobRequest, extra: str = "") -> str:
    """Identity of a request, for Idempotency-Key: the validated fields (so the same
    job sent as multipart or as JSON is the same request) and the upload bytes."""
    h = hashlib.sha256()
    canonical = json.dumps([req.prompt, [c.model_dump() for c in req.concepts],
                            req.params.model_dump(), extra], sort_keys=True)
    h.update(canonical.encode())
    images = [Upload(None, i.data) for i in req.images]
    masks = [Upload(None, m.data) for m in req.masks]
    for u in images + [Upload(None, b"--masks--")] + masks:
        h.update(hashlib.sha256(u.data).digest())
    return h.hexdigest()
