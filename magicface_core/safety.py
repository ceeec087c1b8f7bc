"""An optional check of generated images with Stable Diffusion's own safety checker
(diffusers' StableDiffusionSafetyChecker and its CLIP image processor), for services
that must not hand out what it flags. The paper warns of misuse; the checker's weights
come with SD checkpoints (`safety_checker/`, `feature_extractor/`) or from their own
repository (CompVis/stable-diffusion-safety-checker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["SafetyChecker", "find_safety_checker"]


class SafetyChecker:
    def __init__(self, model, processor, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, source: str, device: torch.device | str = "cpu",
                        **kwargs) -> SafetyChecker:
        """A folder or hub id holding `safety_checker/` and `feature_extractor/`, or
        holding the checker's files at its root (its own repository's layout)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        root = Path(source).expanduser()
        nested = (root / "safety_checker").is_dir() or not root.is_dir()
        sub = {"subfolder": "safety_checker"} if nested else {}
        fe = {"subfolder": "feature_extractor"} if nested else {}
        local = {"local_files_only": True} if root.is_dir() else {}
        model = StableDiffusionSafetyChecker.from_pretrained(str(source), **sub, **local,
                                                             **kwargs)
        processor = CLIPImageProcessor.from_pretrained(str(source), **fe, **local)
        return cls(model, processor, device)

    @torch.no_grad()
    def flags(self, image: Image.Image) -> bool:
        """Whether the checker flags the image."""
        clip_input = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        pixels = clip_input["pixel_values"].to(self.device, self.model.dtype)
        array = np.asarray(image.convert("RGB"), dtype=np.float32)[None] / 255.0
        _, has_nsfw = self.model(clip_input=pixels, images=array)
        return bool(has_nsfw[0])


def find_safety_checker(model: str, override: str | None = None) -> str | None:
    """Where the checker's weights are: `override`, or the checkpoint folder's own
    `safety_checker/`; None when neither is there."""
    if override:
        return override
    root = Path(model).expanduser()
    if (root / "safety_checker").is_dir() and (root / "feature_extractor").is_dir():
        return str(root)
    return None
