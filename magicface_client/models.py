"""What the client sends and gets back: concepts, job views and errors.

Plain dataclasses over the service's JSON rather than a schema library: the client needs
only httpx, and `Job.raw` keeps every field the server sends, including ones added after
this client was written.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    from PIL import Image

    ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | Image.Image"
else:  # at run time (typing.get_type_hints) without importing PIL
    ImageInput = Any

__all__ = ["Concept", "Job", "MagicFaceError", "JobFailed", "TERMINAL", "image_bytes",
           "image_kind", "check_concepts"]

# Statuses after which a job never changes (and the events that announce them).
TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})


def image_bytes(image: ImageInput) -> bytes:
    """The bytes to upload for an image given as a path, bytes or a PIL image.

    Files and bytes go as they are (the server decodes PNG, JPEG and WebP itself, so
    re-encoding would only cost time and, for JPEG, quality); a PIL image is saved as PNG.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # a PIL image; PIL itself is not a dependency of the client
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")


def image_kind(data: bytes) -> tuple[str, str]:
    """(MIME type, file suffix) from the bytes' signature, so that a JPEG is not sent
    labelled as PNG (the server sniffs anyway; proxies and logs read the label)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg", "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return "image/png", "png"


def data_uri(data: bytes) -> str:
    return f"data:{image_kind(data)[0]};base64," + base64.b64encode(data).decode()


@dataclass
class Concept:
    """One reference: the prompt word it customizes, its image and optional mask (white =
    the concept), its weight and the prompt that describes the reference image.

    `image` and `mask` are a path, bytes or a PIL image. Unset `weight` and
    `reference_prompt` are left out of the request so that the server's defaults apply.
    """

    word: str
    image: ImageInput
    mask: ImageInput | None = None
    weight: float | None = None
    reference_prompt: str | None = None

    def spec(self) -> dict[str, Any]:
        """The concept's fields without its images (the multipart `concepts` entry)."""
        out: dict[str, Any] = {"word": self.word}
        if self.weight is not None:
            out["weight"] = self.weight
        if self.reference_prompt is not None:
            out["reference_prompt"] = self.reference_prompt
        return out

    def json_spec(self) -> dict[str, Any]:
        """The JSON body's form: the image and mask inlined as data: URIs."""
        out = self.spec()
        out["image"] = data_uri(image_bytes(self.image))
        if self.mask is not None:
            out["mask"] = data_uri(image_bytes(self.mask))
        return out


def check_concepts(concepts: Sequence[Concept]) -> None:
    """Refuse before uploading what the server would refuse after: no concepts, or masks
    for only some of them (masks pair with concepts by position)."""
    if isinstance(concepts, Concept):
        raise TypeError("concepts: pass a list of Concept, not one Concept")
    if not concepts:
        raise ValueError("concepts: at least one concept is needed")
    with_mask = [c.mask is not None for c in concepts]
    if any(with_mask) and not all(with_mask):
        missing = with_mask.index(False)
        raise ValueError(f"concepts[{missing}].mask: give a mask for every concept or none")


@dataclass
class Job:
    """A job as the service last described it.

    `progress` holds step, total, percent, eta_s and stage; `error` (failed, canceled or
    expired jobs) code and message; `result` (succeeded jobs) image_url, semantic_map_url
    and semantic_map_legend. `raw` is the whole JobView (timestamps, queue position,
    reproducibility, ...).
    """

    id: str
    status: str
    progress: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> Job:
        return cls(id=view["id"], status=view["status"], progress=view.get("progress") or {},
                   error=view.get("error"), result=view.get("result"), raw=view)

    @property
    def done(self) -> bool:
        """Whether the job has ended (it will not change any more)."""
        return self.status in TERMINAL


class MagicFaceError(Exception):
    """An error answer of the service: the HTTP status, `error.code` (stable, for
    programs), `error.message` (for people) and, on 429 and 503, the seconds the server
    asks to wait before retrying."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class JobFailed(Exception):
    """`wait` saw the job end failed, canceled or expired; `job` is its final view (its
    `error` says why)."""

    def __init__(self, job: Job):
        err = job.error or {}
        detail = f"{err.get('code', '')}: {err.get('message', '')}" if err else ""
        super().__init__(f"job {job.id} {job.status}" + (f" ({detail})" if detail else ""))
        self.job = job

    @property
    def status(self) -> str:
        return self.job.status
