"""What the client sends and gets back: concepts, job views and errors."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Concept", "Job", "MagicFaceError", "JobFailed", "TERMINAL", "image_bytes"]

# Statuses after which a job never changes.
TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})


def image_bytes(image: Any) -> bytes:
    """Bytes of an image given as a path, bytes or a PIL image (saved as PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # PIL, without importing it
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image must be a path, bytes or a PIL image, got {type(image)}")


@dataclass
class Concept:
    """One reference: the prompt word it customizes, its image and (optional) mask."""

    word: str
    image: Any
    mask: Any = None
    weight: float | None = None
    reference_prompt: str | None = None

    def spec(self) -> dict:
        out: dict[str, Any] = {"word": self.word}
        if self.weight is not None:
            out["weight"] = self.weight
        if self.reference_prompt is not None:
            out["reference_prompt"] = self.reference_prompt
        return out

    def json_spec(self) -> dict:
        """The JSON body's form: images as data: URIs."""
        out = self.spec()
        out["image"] = _data_uri(image_bytes(self.image))
        if self.mask is not None:
            out["mask"] = _data_uri(image_bytes(self.mask))
        return out


def _data_uri(data: bytes) -> str:
    kind = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else (
        "image/webp" if data[8:12] == b"WEBP" else "image/png")
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@dataclass
class Job:
    """A job's view as the service last answered it (`raw` holds every field)."""

    id: str
    status: str
    progress: dict = field(default_factory=dict)
    error: dict | None = None
    result: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_view(cls, view: dict) -> Job:
        return cls(id=view["id"], status=view["status"], progress=view.get("progress") or {},
                   error=view.get("error"), result=view.get("result"), raw=view)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class MagicFaceError(Exception):
    """An error answer of the service: HTTP status, `error.code`, `error.message`."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = (status, code, message,
                                                                   retry_after)


class JobFailed(Exception):
    """`wait` found the job failed, canceled or expired; `job` is its final view."""

    def __init__(self, job: Job):
        err = job.error or {}
        super().__init__(f"job {job.id} {job.status}: {err.get('code', '')} "
                         f"{err.get('message', '')}".rstrip())
        self.job = job
