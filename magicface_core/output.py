"""What `MagicFacePipeline.__call__` returns, diffusers-style."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers.utils import BaseOutput

__all__ = ["MagicFacePipelineOutput"]


@dataclass
class MagicFacePipelineOutput(BaseOutput):
    """`images`: a list of PIL images, an (k, H, W, 3) array, a (k, 3, H, W) tensor or
    (k, C, h, w) latents, per `output_type`. `semantic_maps`: per image, its list of
    (h, w) label maps, one per step (0 background, i = concept i). `results`: each
    image's MagicFaceResult (the config as run, cache hits, masks)."""

    images: Any
    semantic_maps: list = field(default_factory=list)
    results: list = field(default_factory=list)
