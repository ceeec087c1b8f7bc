"""`generate`: one image, built on `generate_batch`, and the pieces it prepares a
request with (concept tokens, the references, the scheduler) and decodes it with."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ..config import Concept, GenerationConfig
from ..ddim import supports_fast_ddim
from ..inputs import check_call, check_noise
from ..reference import PreparedReference, prepare_reference
from ..sampling import make_scheduler, prepare_call
from ..sampling.steps import StepEndCallback
from ..tokens import word_token_indices
from .results import (
    GenerationRequest,
    MagicFaceResult,
    PreparedRequest,
    ReferencesCallback,
    StepCallback,
    to_pil,
)


class GenerateMixin:
    """`MagicFacePipeline.generate` and what it prepares and decodes with."""

    def make_scheduler(self, config: GenerationConfig):
        """The DDIM scheduler a call with `config` runs (see sampling.make_scheduler)."""
        return make_scheduler(self.scheduler, config)

    def concept_tokens(self, prompt: str, concepts: Sequence[Concept]) -> list[list[int]]:
        return [word_token_indices(self.tokenizer, prompt, c.word) for c in concepts]

    def _sam_factory(self, config: GenerationConfig) -> Callable[[], object] | None:
        if self.sam_predictor is not None:
            return lambda: self.sam_predictor
        if not config.sam_checkpoint:
            return None

        def load():
            from ..masks import load_sam_predictor

            key = (config.sam_checkpoint, config.sam_model_type)
            if self._sam_key != key:
                self._sam_predictor_loaded = load_sam_predictor(
                    config.sam_checkpoint, config.sam_model_type, str(self.device))
                self._sam_key = key
            return self._sam_predictor_loaded

        return load

    def prepare_references(self, concepts: Sequence[Concept],
                           config: GenerationConfig) -> list[PreparedReference]:
        sam = self._sam_factory(config)
        return [prepare_reference(c, i, config.height, config.width, sam,
                                  self.mask_proposer)
                for i, c in enumerate(concepts)]

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        concepts: Sequence[Concept] = (),
        config: GenerationConfig | None = None,
        on_step: StepCallback | None = None,
        *,
        latents: torch.Tensor | None = None,
        reference_noise: torch.Tensor | None = None,
        on_step_end: StepEndCallback | None = None,
        on_references: ReferencesCallback | None = None,
    ) -> MagicFaceResult:
        """Sample one image. `on_step(step, total)` runs after every step; an exception
        raised in it aborts the run (the UNet is left as it was) and propagates.

        `latents` (1, C, h, w) replaces the seeded z_T, and `reference_noise`
        (steps, N, C, h, w) the seeded reference-path noise (`reference_noise[i, j]`
        noises concept j's latent at step i), as diffusers' `latents=` does: with
        both, a run of another implementation can be reproduced. The K/V cache keys
        explicit noise by its content. `on_step_end(i, timestep, latents)` runs after
        each step and may return replacement latents.

        `on_references(n_prepared)` runs once, after the references are decoded, masked
        and letterboxed and before the first step, with their number (0 without
        concepts): e.g. to end a progress bar over the references and start one over
        the steps. An exception raised in it aborts the run and propagates.
        """
        out = self.generate_batch([GenerationRequest(
            prompt, concepts, config, on_step, latents=latents,
            reference_noise=reference_noise, on_step_end=on_step_end,
            on_references=on_references)], max_batch=1)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def _prepare(self, r: GenerationRequest) -> PreparedRequest:
        """A request checked, resolved and prepared for a loop (the caller holds the
        lock: prepare_call runs the text encoder)."""
        # 1. Check and resolve the inputs (every preset-picked field filled in).
        config = r.config or GenerationConfig()
        check_call(r.prompt, r.concepts, config)
        config = config.resolve(len(r.concepts))
        concept_tokens = self.concept_tokens(r.prompt, r.concepts)
        check_noise(config, len(r.concepts), self.unet.config.in_channels,
                    self.vae_scale_factor, r.latents, r.reference_noise)
        # 2. Decode, mask and letterbox the references.
        refs = self.prepare_references(r.concepts, config)
        if r.on_references is not None:
            r.on_references(len(refs))
        # 3. Scheduler, grids, z_T, embeddings, token tables.
        call = prepare_call(self.components, r.prompt, refs, concept_tokens, config,
                            device=self.device, dtype=self.dtype, latents=r.latents,
                            reference_noise=r.reference_noise)
        return PreparedRequest(call, config.fast_path and supports_fast_ddim(call.scheduler))

    @torch.no_grad()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (k, C, h, w) -> images (k, 3, H, W) in [0, 1], float32."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                            return_dict=False)[0]
        return (x / 2 + 0.5).clamp(0, 1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        return to_pil(self.decode_tensor(latents).cpu().permute(0, 2, 3, 1).numpy())[0]
