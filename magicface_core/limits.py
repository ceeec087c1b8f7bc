"""The limits of every request field: one table, read by the library's own checks
(`GenerationConfig`, `Concept`, a call's concept count), the CLI (its help and its
checks before a model loads) and the gateway (its validation, its OpenAPI ranges and
the defaults of MAX_STEPS, MAX_SIZE, MAX_CONCEPTS, which an operator may only lower).
Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limit", "LIMITS", "limit", "TEXT_LIMITS", "IMAGE_LIMITS"]


@dataclass(frozen=True)
class Limit:
    low: float
    high: float
    low_open: bool = False  # (low, high] instead of [low, high]
    multiple_of: int | None = None

    def check(self, name: str, value: float) -> str | None:
        """What is wrong with `value`, as a message naming `name`; None when fine."""
        lo_ok = value > self.low if self.low_open else value >= self.low
        if not lo_ok or value > self.high:
            return f"{name} must be in {self.describe()}, got {value:g}"
        if self.multiple_of and int(value) % self.multiple_of:
            return f"{name} must be a multiple of {self.multiple_of}, got {value:g}"
        return None

    def describe(self) -> str:
        lo = "(" if self.low_open else "["
        return f"{lo}{self.low:g}, {self.high:g}]"


LIMITS: dict[str, Limit] = {
    "steps": Limit(1, 200),
    "guidance_scale": Limit(0, 50),
    "alpha": Limit(0, 1),
    "seed": Limit(0, 2**63 - 1),
    "width": Limit(64, 2048, multiple_of=8),
    "height": Limit(64, 2048, multiple_of=8),
    # A concept's RSA/RBA weight (the paper's w_i; its experiments use 1-5).
    "weight": Limit(0, 20, low_open=True),
    "ca_scale": Limit(0, 1, low_open=True),
    # Concepts per call: each adds a reference row to every UNet call.
    "concepts": Limit(1, 4),
}

# Longest strings (characters).
TEXT_LIMITS: dict[str, int] = {"prompt": 1000, "negative_prompt": 1000, "word": 64,
                               "reference_prompt": 300}

# A reference image or mask: its pixels (width x height, as stored) and, for uploads,
# its encoded bytes. The gateway's MAX_IMAGE_PIXELS / MAX_IMAGE_BYTES default to these.
IMAGE_LIMITS: dict[str, int] = {"pixels": 4096 * 4096, "bytes": 10 * 2**20}


def limit(name: str) -> Limit:
    return LIMITS[name]
