"""The reference path: preparing each concept's image and mask, VAE encoding, and
the per-step forward diffusion of the reference latents."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import AUTO_MASK, Concept
from .errors import MagicFaceInputError
from .masks import binarize_mask, letterbox, load_image, sam_mask

__all__ = ["PreparedReference", "prepare_reference", "encode_latents", "reference_noise",
           "noised_reference_latents", "noise_seed"]


@dataclass
class PreparedReference:
    """A concept ready for the reference path, letterboxed to the model resolution."""

    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor  # (H, W) bool, the concept's pixels
    prompt: str
    word: str
    weight: float
    image: Image.Image  # the letterboxed RGB image (for hashing and display)


def prepare_reference(
    concept: Concept,
    index: int,
    height: int,
    width: int,
    sam_predictor: Callable[[], object] | None = None,
    proposer: Callable[..., Any] | None = None,
) -> PreparedReference:
    """Decode, mask and letterbox one concept.

    The mask is the user's (thresholded at 50% grey, same size as the image), the
    `proposer`'s from the word (`mask="auto"`, or no mask and a proposer), or an
    automatic SAM mask; `sam_predictor` is a factory called only when needed.
    """
    label = f"concepts[{index}] ('{concept.word}')"
    image = load_image(concept.image, f"{label} image").convert("RGB")
    auto = isinstance(concept.mask, str) and concept.mask == AUTO_MASK
    wants_proposal = auto or (concept.mask is None and concept.box is None
                              and proposer is not None)
    if wants_proposal:
        if proposer is None:
            raise MagicFaceInputError(f"{label} asks for mask='auto' but no mask proposer "
                                      "is set: pipe.enable_auto_masks(...)")
        mask = binarize_mask(proposer(image, concept.word,
                                      reference_prompt=concept.reference_prompt,
                                      index=index).mask)
    elif concept.mask is not None:
        mask_img = load_image(concept.mask, f"{label} mask")
        if mask_img.size != image.size:
            raise MagicFaceInputError(f"{label} mask is {mask_img.width}x{mask_img.height} but its "
                             f"image is {image.width}x{image.height}")
        mask = binarize_mask(mask_img)
    else:
        if sam_predictor is None:
            raise MagicFaceInputError(
                f"{label} has no mask and no sam_checkpoint is configured for "
                             "automatic masks")
        if concept.box is not None:
            x0, y0, x1, y1 = concept.box
            if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
                raise MagicFaceInputError(f"{label} box {concept.box} lies outside the "
                                 f"{image.width}x{image.height} image")
        mask = sam_mask(sam_predictor(), image, concept.box)
    boxed = letterbox(image, width, height, fill=(0, 0, 0))
    mask_boxed = letterbox(Image.fromarray(mask.astype(np.uint8) * 255, "L"), width, height,
                           fill=0, resample=Image.Resampling.NEAREST)
    pixels = torch.from_numpy(np.asarray(boxed, dtype=np.float32) / 127.5 - 1.0)
    return PreparedReference(
        pixels=pixels.permute(2, 0, 1)[None].contiguous(),
        mask=torch.from_numpy(np.asarray(mask_boxed) >= 128),
        prompt=concept.prompt_for_reference,
        word=concept.word,
        weight=float(concept.weight),
        image=boxed,
    )


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior mean x scaling factor (no sampling: the reference is deterministic)."""
    p = pixels.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(p).latent_dist.mean * vae.config.scaling_factor


def noise_seed(seed: int, concept_index: int, step: int) -> int:
    """A 63-bit seed from (seed, concept index, step), independent of the target's
    random stream so that references never shift the target's noise."""
    h = hashlib.blake2b(f"magicface-ref:{seed}:{concept_index}:{step}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def reference_noise(shape: tuple[int, ...], seed: int, concept_index: int,
                    step: int) -> torch.Tensor:
    """Deterministic float32 CPU noise for one reference at one step."""
    g = torch.Generator("cpu").manual_seed(noise_seed(seed, concept_index, step))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def noised_reference_latents(
    scheduler, latents: torch.Tensor, timesteps: torch.Tensor, seed: int,
    concept_indices: list[int] | None = None, noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_{i,t} = add_noise(z_i, eps_{i,t}, t) for every step t and concept i, made once
    before the loop: (steps, N, C, h, w) on the latents' device and dtype.
    `concept_indices` names the concept of each latent (default 0..N-1). `noise`
    (steps, all concepts, C, h, w) gives eps explicitly instead of the seeded draws."""
    indices = list(range(latents.shape[0])) if concept_indices is None else concept_indices
    out = []
    for step, t in enumerate(timesteps):
        if noise is not None:
            eps = noise[step, indices].float().cpu()
        else:
            eps = torch.cat([reference_noise(tuple(latents.shape[1:]), seed, i, step)[None]
                             for i in indices])
        noisy = scheduler.add_noise(latents.float().cpu(), eps, t.reshape(1).cpu())
        out.append(noisy)
    return torch.stack(out).to(device=latents.device, dtype=latents.dtype)
