"""Generation settings and the concept description, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import MagicFaceInputError
from .limits import LIMITS, TEXT_LIMITS
from .rules import DEFAULT_PRESET, DEFAULT_WEIGHT, PRESETS, concept_problems

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

MIN_STEPS, MAX_STEPS = int(LIMITS["steps"].low), int(LIMITS["steps"].high)


# The negative prompt of the authors' configs (configs/config_stable_diffusion.yaml),
# used for every published image.
AUTHORS_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, text, error, cropped, worst quality, low quality, normal quality, "
    "jpeg artifacts, blurry, freak, disharmony, ugly, horrible, disabled body, naked"
)

# What each preset picks for the fields left at None. "paper": the equations only.
# "authors": what the authors' public code computes (it made every published image).
# ca_scale under "authors" depends on the number of concepts (resolved in `resolve`).
_PRESET_VALUES: dict[str, dict[str, Any]] = {
    "paper": {
        "negative_prompt": "",
        "ca_scale": 1.0,
        "foreground_mask": False,
        "region_guidance": False,
        "map_refinement": "s",
        "map_aggregation": "mean",
        "map_tokens": "prompt",
        "rba_start": "round",
        "ddim_schedule": "checkpoint",
    },
    "authors": {
        "negative_prompt": AUTHORS_NEGATIVE_PROMPT,
        "ca_scale": None,  # 0.9 for one concept, 0.6 for several (their configs' advice)
        "foreground_mask": None,  # on when ca_scale < 0.9, as their get_mask does
        "region_guidance": True,
        "map_refinement": "s+3s2",
        "map_aggregation": "smooth_meannorm",
        "map_tokens": "all",
        "rba_start": "after_floor",
        "ddim_schedule": "authors",
    },
}

_CHOICES = {
    "map_refinement": ("s", "s+3s2"),
    "map_aggregation": ("mean", "smooth_meannorm"),
    "map_tokens": ("prompt", "all"),
    "rba_start": ("round", "after_floor"),
    "ddim_schedule": ("checkpoint", "authors"),
}


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MagicFaceInputError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise MagicFaceInputError(f"{name} must be finite, got {value!r}")
    return float(value)


def _within(field: str, value: float, name: str | None = None) -> None:
    problem = LIMITS[field].check(name or field, value)
    if problem:
        raise MagicFaceInputError(problem)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling parameters: SD1.5/2.x, DDIM 50, CFG 7.5, alpha 0.4 (the paper's).

    `preset` picks how the method's details are computed: "authors" (default)
    reproduces the authors' public code, which made every published image; "paper"
    is the paper's equations alone. Each detail a preset picks is a field of its own
    (None: the preset's value); `resolve(n_concepts)` fills them in.
    """

    steps: int = 50
    guidance_scale: float = 7.5
    alpha: float = 0.4
    seed: int = 0
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    preset: str = DEFAULT_PRESET
    # Seed of the reference-path noise; None derives it from `seed`. The service
    # may pin it so that one reference's cached K/V serves requests of any seed.
    reference_seed: int | None = None
    reference_layers: tuple[str, ...] = DEFAULT_REFERENCE_LAYERS
    # Semantic-map grid as a fraction of the latent grid (1/2: 32x32 at 512px).
    map_downscale: int = 2
    # Semantic map (Eqs. 3-5). "s": C^ = S C (the paper); "s+3s2": ((S + 3 S^2) / 4) C.
    map_refinement: str | None = None
    # "mean": average the layers, renormalise each token over space (the paper);
    # "smooth_meannorm": 3x3 Gaussian (sigma 0.5) per layer, divide by its spatial
    # mean, then average (the authors').
    map_aggregation: str | None = None
    # "prompt": only the prompt's own tokens compete in the argmax; "all": all 77
    # positions do (<start> then usually takes the background).
    map_tokens: str | None = None
    # Non-concept tokens' scores are multiplied by this before the argmax.
    ca_scale: float | None = None
    # Keep concept regions inside the foreground (<start> vs the other tokens, on the
    # unconditional branch's maps).
    foreground_mask: bool | None = None
    # "round": RBA from step round(alpha * steps) (the paper); "after_floor": from
    # step int(alpha * steps) + 1 (the authors').
    rba_start: str | None = None
    # "checkpoint": the checkpoint's DDIM settings; "authors": the DDIM the authors'
    # code runs (SD's betas, steps_offset 1, leading spacing, no final alpha of one).
    ddim_schedule: str | None = None
    # Region-adaptive CFG of the authors' code: per-token guidance rate, clamped to
    # [min, max] and to at most `region_guidance_cap / guidance_scale`, smoothed.
    region_guidance: bool | None = None
    region_guidance_min: float = 0.8
    region_guidance_max: float = 3.0
    region_guidance_cap: float = 15.0
    # Automatic masks (segment-anything) for concepts without one.
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    return_semantic_maps: bool = True
    # The fast loop (static buffers, K/V cache, CUDA graphs). False runs the plain
    # reference loop, kept to check the fast one against.
    fast_path: bool = True

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_method()

    def _check_sampling(self) -> None:
        """Steps, guidance, alpha, seeds and size."""
        for name in ("steps", "seed", "height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise MagicFaceInputError(f"{name} must be an integer, got {v!r}")
            _within(name, v)
        for name in ("guidance_scale", "alpha"):
            _within(name, _check_finite(name, getattr(self, name)))
        if self.reference_seed is not None and (
            isinstance(self.reference_seed, bool)
            or not isinstance(self.reference_seed, int)
            or not 0 <= self.reference_seed < 2**63
        ):
            raise MagicFaceInputError("reference_seed must be None or an integer in "
                                      f"[0, 2**63), got {self.reference_seed!r}")
        if self.negative_prompt is not None and isinstance(self.negative_prompt, str) and \
                len(self.negative_prompt) > TEXT_LIMITS["negative_prompt"]:
            raise MagicFaceInputError("negative_prompt must be at most "
                                      f"{TEXT_LIMITS['negative_prompt']} characters")

    def _check_method(self) -> None:
        """The preset and the fields it picks, the layers and the map grid."""
        if self.preset not in PRESETS:
            raise MagicFaceInputError(
                f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise MagicFaceInputError("negative_prompt must be a string or None")
        for name, choices in _CHOICES.items():
            v = getattr(self, name)
            if v is not None and v not in choices:
                raise MagicFaceInputError(
                    f"{name} must be one of {', '.join(choices)}, got {v!r}")
        for name in ("foreground_mask", "region_guidance"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise MagicFaceInputError(f"{name} must be true, false or None, got {v!r}")
        if isinstance(self.map_downscale, bool) or self.map_downscale not in (1, 2, 4, 8):
            raise MagicFaceInputError(
                f"map_downscale must be one of 1, 2, 4, 8, got {self.map_downscale!r}")
        if not isinstance(self.reference_layers, tuple) or not all(
            isinstance(x, str) and x for x in self.reference_layers
        ):
            raise MagicFaceInputError("reference_layers must be a tuple of module-name prefixes")
        if self.ca_scale is not None:
            _within("ca_scale", _check_finite("ca_scale", self.ca_scale))
        lo = _check_finite("region_guidance_min", self.region_guidance_min)
        hi = _check_finite("region_guidance_max", self.region_guidance_max)
        if not 0.0 <= lo <= hi:
            raise MagicFaceInputError("region_guidance_min must be >= 0 and <= "
                                      f"region_guidance_max, got {lo}, {hi}")
        cap = _check_finite("region_guidance_cap", self.region_guidance_cap)
        if cap <= 0:
            raise MagicFaceInputError(f"region_guidance_cap must be > 0, got {cap}")

    def resolve(self, n_concepts: int) -> GenerationConfig:
        """This config with every preset-picked field (None) set to the preset's value
        for a call with `n_concepts` concepts."""
        values = _PRESET_VALUES[self.preset]
        changes = {k: v for k, v in values.items() if getattr(self, k) is None}
        if "ca_scale" in changes and changes["ca_scale"] is None:
            changes["ca_scale"] = 0.9 if n_concepts <= 1 else 0.6
        ca = changes.get("ca_scale", self.ca_scale)
        if "foreground_mask" in changes and changes["foreground_mask"] is None:
            changes["foreground_mask"] = ca < 0.9
        return replace(self, **changes) if changes else self

    @property
    def rsa_steps(self) -> int:
        """Number of leading steps that use RSA; the rest use RBA (from the resolved
        `rba_start`; unresolved, the preset's rule)."""
        rule = self.rba_start or _PRESET_VALUES[self.preset]["rba_start"]
        if rule == "after_floor":
            # The authors' code switches when step > int(alpha * steps).
            return min(self.steps, int(self.alpha * self.steps) + 1)
        # Python's round() is banker's rounding; the paper means round-half-up.
        return min(self.steps, int(math.floor(self.alpha * self.steps + 0.5)))

    def replace(self, **changes: Any) -> GenerationConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# Concept(mask=AUTO_MASK): the mask proposed from the word (pipe.enable_auto_masks).
AUTO_MASK = "auto"


@dataclass
class Concept:
    """One reference concept: an image, the prompt word it customizes, and its mask.

    `image` and `mask` are PIL images, paths, bytes, numpy arrays or torch tensors
    ((H, W[, C]) or (C, H, W); uint8, or floats in [0, 1]), decoded on use.
    `mask="auto"` asks the pipeline's mask proposer (`enable_auto_masks`) for the
    word's region; so does no mask while a proposer is set. With no mask and no
    proposer, an automatic segment-anything mask is computed (needs `sam_checkpoint`).
    `box` (x0, y0, x1, y1 in image pixels) narrows that automatic SAM mask's prompt.
    """

    image: Any
    word: str
    mask: Any = None
    weight: float = DEFAULT_WEIGHT
    reference_prompt: str | None = None
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        # The rule book's checks of one concept (the prompt's come with the call).
        def label(_: int, part: str) -> str:
            return "concept word" if part == "word" else f"{part} of concept '{self.word}'"

        problems = concept_problems(None, [self], field=label)
        if problems:
            raise MagicFaceInputError(problems[0].text())
        if self.box is not None:
            if len(self.box) != 4:
                raise MagicFaceInputError(f"box of concept '{self.word}' must be (x0, y0, x1, y1)")
            x0, y0, x1, y1 = (_check_finite(f"box of concept '{self.word}'", b) for b in self.box)
            if not (x1 > x0 and y1 > y0):
                raise MagicFaceInputError(
                    f"box of concept '{self.word}' must have x1 > x0 and y1 > y0")

    @property
    def prompt_for_reference(self) -> str:
        return self.reference_prompt if self.reference_prompt else self.word
