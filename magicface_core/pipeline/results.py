"""What `generate_batch` takes and gives: a request, its result, the callbacks' types,
and a request once prepared for a loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..config import Concept, GenerationConfig
from ..sampling.prepare import PreparedCall
from ..sampling.steps import SampleOutput, StepEndCallback

StepCallback = Callable[[int, int], None]
# on_references(n_prepared): a call's references are ready and no step has run yet.
ReferencesCallback = Callable[[int], None]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class MagicFaceResult:
    # None only in `__call__(output_type="latent")`'s results (nothing decoded).
    image: Image.Image | None
    # One (h, w) long label map per step (0 = background, i = concept i), on the CPU.
    semantic_maps: list[torch.Tensor] = field(default_factory=list)
    latents: torch.Tensor | None = None  # the final latents, before VAE decoding
    concept_tokens: list[list[int]] = field(default_factory=list)
    rsa_steps: int = 0
    masks: list[torch.Tensor] = field(default_factory=list)  # letterboxed concept masks
    cache_hits: int = 0  # references whose K/V came from the cache
    cache_misses: int = 0  # references computed and stored in the cache
    # The config as run: every field the preset picks filled in.
    config: GenerationConfig | None = None


@dataclass
class GenerationRequest:
    """One image to make, as `generate` takes it: for `generate_batch`."""

    prompt: str
    concepts: Sequence[Concept] = ()
    config: GenerationConfig | None = None
    on_step: StepCallback | None = None
    latents: torch.Tensor | None = None
    reference_noise: torch.Tensor | None = None
    on_step_end: StepEndCallback | None = None
    # Last, so that requests built positionally before it existed mean the same.
    on_references: ReferencesCallback | None = None


@dataclass
class PreparedRequest:
    call: PreparedCall
    fast: bool  # runs on the fast loop

    def result(self, out: SampleOutput) -> MagicFaceResult:
        call = self.call
        return MagicFaceResult(
            image=None, semantic_maps=out.semantic_maps, latents=out.latents,
            concept_tokens=call.concept_tokens, rsa_steps=call.rsa_steps if call.n else 0,
            masks=[r.mask for r in call.refs], cache_hits=out.cache_hits,
            cache_misses=out.cache_misses, config=call.config)


def to_pil(arr: np.ndarray) -> list[Image.Image]:
    """(k, H, W, 3) floats in [0, 1] -> k PIL images, rounded as diffusers'
    `numpy_to_pil` rounds."""
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
