"""Generation settings and the concept description, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

# The decoder self-attention layers at 32x32 and 64x64 for a 512x512 SD1.x/2.x
# image: the paper's "blocks 5 and 6" (down1..3, mid, up1..3 counted from 0).
DEFAULT_REFERENCE_LAYERS: tuple[str, ...] = (
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
)

MIN_STEPS, MAX_STEPS = 1, 200


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling parameters. Defaults are the paper's (SD1.5, DDIM 50, CFG 7.5, alpha 0.4)."""

    steps: int = 50
    guidance_scale: float = 7.5
    alpha: float = 0.4
    seed: int = 0
    height: int = 512
    width: int = 512
    negative_prompt: str = ""
    # Seed of the reference-path noise; None derives it from `seed`. The service
    # may pin it so that one reference's cached K/V serves requests of any seed.
    reference_seed: int | None = None
    reference_layers: tuple[str, ...] = DEFAULT_REFERENCE_LAYERS
    # Semantic-map grid as a fraction of the latent grid (1/2: 32x32 at 512px).
    map_downscale: int = 2
    # Optional extras of the authors' code (off by default).
    ca_scale: float = 1.0
    region_guidance: bool = False
    region_guidance_min: float = 0.5
    region_guidance_max: float = 2.0
    # Automatic masks (segment-anything) for concepts without one.
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    return_semantic_maps: bool = True
    # The fast loop (static buffers, K/V cache, CUDA graphs). False runs the plain
    # reference loop, kept to check the fast one against.
    fast_path: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise ValueError(f"steps must be an integer, got {self.steps!r}")
        if not MIN_STEPS <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [{MIN_STEPS}, {MAX_STEPS}], got {self.steps}")
        g = _check_finite("guidance_scale", self.guidance_scale)
        if g < 0 or g > 50:
            raise ValueError(f"guidance_scale must be in [0, 50], got {g}")
        a = _check_finite("alpha", self.alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {a}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.reference_seed is not None and (
            isinstance(self.reference_seed, bool)
            or not isinstance(self.reference_seed, int)
            or not 0 <= self.reference_seed < 2**63
        ):
            raise ValueError(f"reference_seed must be None or an integer in [0, 2**63), "
                             f"got {self.reference_seed!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < 64 or v > 2048:
                raise ValueError(f"{name} must be in [64, 2048], got {v}")
            if v % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {v}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError("negative_prompt must be a string")
        if isinstance(self.map_downscale, bool) or self.map_downscale not in (1, 2, 4, 8):
            raise ValueError(f"map_downscale must be one of 1, 2, 4, 8, got {self.map_downscale!r}")
        if not isinstance(self.reference_layers, tuple) or not all(
            isinstance(x, str) and x for x in self.reference_layers
        ):
            raise ValueError("reference_layers must be a tuple of module-name prefixes")
        c = _check_finite("ca_scale", self.ca_scale)
        if not 0.0 < c <= 1.0:
            raise ValueError(f"ca_scale must be in (0, 1], got {c}")
        lo = _check_finite("region_guidance_min", self.region_guidance_min)
        hi = _check_finite("region_guidance_max", self.region_guidance_max)
        if not 0.0 <= lo <= 1.0 <= hi:
            raise ValueError("region_guidance_min must be in [0, 1] and region_guidance_max >= 1, "
                             f"got {lo}, {hi}")

    @property
    def rsa_steps(self) -> int:
        """Number of leading steps that use RSA; the rest use RBA."""
        # Python's round() is banker's rounding; the paper means round-half-up.
        return min(self.steps, int(math.floor(self.alpha * self.steps + 0.5)))

    def replace(self, **changes: Any) -> GenerationConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class Concept:
    """One reference concept: an image, the prompt word it customizes, and its mask.

    `image` and `mask` are PIL images (or paths / bytes, decoded on use). With no
    mask, an automatic segment-anything mask is computed (needs `sam_checkpoint`).
    `box` (x0, y0, x1, y1 in image pixels) narrows the automatic mask's prompt.
    """

    image: Any
    word: str
    mask: Any = None
    weight: float = 3.0
    reference_prompt: str | None = None
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.word, str) or not self.word.strip():
            raise ValueError("concept word must be a non-empty string")
        w = _check_finite(f"weight of concept '{self.word}'", self.weight)
        if w <= 0:
            raise ValueError(f"weight of concept '{self.word}' must be > 0, got {w}")
        if self.reference_prompt is not None and not isinstance(self.reference_prompt, str):
            raise ValueError(f"reference_prompt of concept '{self.word}' must be a string")
        if self.box is not None:
            if len(self.box) != 4:
                raise ValueError(f"box of concept '{self.word}' must be (x0, y0, x1, y1)")
            x0, y0, x1, y1 = (_check_finite(f"box of concept '{self.word}'", b) for b in self.box)
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"box of concept '{self.word}' must have x1 > x0 and y1 > y0")

    @property
    def prompt_for_reference(self) -> str:
        return self.reference_prompt if self.reference_prompt else self.word
