"""MagicFacePipeline: the two-stage (RSA, then RBA) sampling loop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .attention import (
    AttentionState,
    MagicFaceAttnProcessor,
    RecordingAttnProcessor,
    level_grid,
)
from .config import Concept, GenerationConfig
from .ddim import supports_fast_ddim
from .guidance import cfg, region_adaptive_cfg
from .kv_cache import ReferenceKVCache
from .models import Components, load_components, save_components, tiny_components
from .reference import (
    PreparedReference,
    encode_latents,
    noised_reference_latents,
    prepare_reference,
)
from .sampler import FastSampler
from .segmentation import semantic_regions, token_tables
from .tokens import word_token_indices

__all__ = ["MagicFacePipeline", "MagicFaceResult"]

StepCallback = Callable[[int, int], None]


@dataclass
class MagicFaceResult:
    image: Image.Image
    # One (h, w) long label map per step (0 = background, i = concept i), on the CPU.
    semantic_maps: list[torch.Tensor] = field(default_factory=list)
    latents: torch.Tensor | None = None
    concept_tokens: list[list[int]] = field(default_factory=list)
    rsa_steps: int = 0
    masks: list[torch.Tensor] = field(default_factory=list)  # letterboxed concept masks
    cache_hits: int = 0  # references whose K/V came from the cache
    cache_misses: int = 0  # references computed and stored in the cache
    # The config as run: every field the preset picks filled in.
    config: GenerationConfig | None = None


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


class MagicFacePipeline:
    """Training-free customization of SD1.x / SD2.x with one reference per concept.

    One `generate` at a time per pipeline (calls are serialised by a lock): the
    attention processors are installed for the duration of a call.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *,
                 model_name: str = "custom"):
        from diffusers import DDIMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = (scheduler if isinstance(scheduler, DDIMScheduler)
                          else DDIMScheduler.from_config(scheduler.config))
        self.model_name = model_name
        self.sam_predictor = None  # set directly, or loaded from config.sam_checkpoint
        self._sam_key: tuple[str, str] | None = None
        self._lock = threading.Lock()
        # Reference K/V cache (None: off); see enable_kv_cache.
        self.kv_cache: ReferenceKVCache | None = None
        # Capture each step variant as a CUDA graph (CUDA only; fast path only).
        self.use_cuda_graphs = True
        self._fast = FastSampler(self)

    def enable_kv_cache(self, device_bytes: int = 4 << 30,
                        host_bytes: int = 16 << 30) -> ReferenceKVCache:
        """Cache reference K/V by content hash: a repeated reference skips its
        reference-path rows. Budgets in bytes (GPU tier, then host spill)."""
        self.kv_cache = ReferenceKVCache(device_bytes=device_bytes, host_bytes=host_bytes)
        return self.kv_cache

    def enable_compile(self, mode: str = "default", options: dict | None = None) -> None:
        """torch.compile the UNet for the fast path (falls back to eager on failure).
        `options` (inductor config, e.g. `{"conv_1x1_as_mm": True}`) replaces `mode`."""
        self._fast.enable_compile(mode, options)

    def fuse_qkv_projections(self) -> None:
        """One matmul for each self-attention's Q, K, V and each cross-attention's K, V
        (diffusers' fused projections; same maths, fewer kernels). Both loops and every
        processor of this library use the fused weights once set."""
        self.unet.fuse_qkv_projections()
        self._fast.plans.clear()

    @property
    def fold_attention_bias(self) -> bool:
        """Fast path: carry RSA/RBA's bias in extra head dims so SDPA runs without a
        mask (flash-eligible, no dense (Lq x Lk) bias). Same output up to the rounding
        of w*sqrt(d) to the model dtype. On by default (measured faster on an H100)."""
        return self._fast.fold_bias

    @fold_attention_bias.setter
    def fold_attention_bias(self, enabled: bool) -> None:
        self._fast.fold_bias = bool(enabled)

    @property
    def fold_min_tokens(self) -> int:
        """With `fold_attention_bias`: fold only levels of at least this many query
        tokens (h*w); coarser levels keep the dense bias. 0 folds every level."""
        return self._fast.fold_min_tokens

    @fold_min_tokens.setter
    def fold_min_tokens(self, tokens: int) -> None:
        if int(tokens) < 0:
            raise ValueError(f"fold_min_tokens must be >= 0, got {tokens}")
        self._fast.fold_min_tokens = int(tokens)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_components(cls, c: Components, model_name: str = "custom") -> MagicFacePipeline:
        return cls(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler,
                   model_name=model_name)

    @classmethod
    def from_pretrained(cls, model: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, **kwargs) -> MagicFacePipeline:
        """Load a diffusers SD1.x/SD2.x checkpoint: a local folder or a hub id.

        dtype defaults to fp16 on CUDA and fp32 elsewhere.
        """
        device = torch.device(device)
        dtype = dtype or _default_dtype(device)
        comps = load_components(model, device=device, dtype=dtype, **kwargs)
        return cls.from_components(comps, model_name=str(model))

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu") -> MagicFacePipeline:
        """Random weights with SD1.5's module names: runs the whole method, makes noise."""
        pipe = cls.from_components(tiny_components(seed), model_name=f"tiny-{seed}")
        return pipe.to(device)

    def save_pretrained(self, directory: str | Path) -> Path:
        from .models import Components

        return save_components(Components(self.unet, self.vae, self.text_encoder,
                                          self.tokenizer, self.scheduler), directory)

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> MagicFacePipeline:
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kw:
            for m in (self.unet, self.vae, self.text_encoder):
                m.to(**kw)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- pieces -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states, (B, 77, D), as StableDiffusionPipeline encodes them."""
        ids = self.tokenizer(list(prompts), padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long().to(self.text_encoder.device)
        out = self.text_encoder(ids.to(self.text_encoder.device), attention_mask=mask)[0]
        return out.to(dtype=self.unet.dtype, device=self.device)

    def unet_embeddings(self, prompt: str, negative_prompt: str, do_cfg: bool,
                        reference_prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings in UNet batch order: [negative,] prompt, then one row per
        riding reference."""
        cond = self.encode_prompt([prompt])
        embeds = [self.encode_prompt([negative_prompt]), cond] if do_cfg else [cond]
        if reference_prompts:
            embeds.append(self.encode_prompt(list(reference_prompts)))
        return torch.cat(embeds)

    def concept_tokens(self, prompt: str, concepts: Sequence[Concept]) -> list[list[int]]:
        return [word_token_indices(self.tokenizer, prompt, c.word) for c in concepts]

    def _prompt_positions(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, truncation=True,
                             max_length=self.tokenizer.model_max_length)["input_ids"]
        return list(range(1, max(2, len(ids) - 1)))

    def token_tables(self, prompt: str, concept_tokens: Sequence[Sequence[int]],
                     config: GenerationConfig, device: torch.device | str = "cpu"):
        """The semantic map's (bias, scale, label_of) token tables for a resolved config."""
        candidates = (None if config.map_tokens == "all"
                      else self._prompt_positions(prompt))
        return token_tables(self.tokenizer.model_max_length, concept_tokens, candidates,
                            config.ca_scale, device=device)

    def _sam_factory(self, config: GenerationConfig) -> Callable[[], object] | None:
        if self.sam_predictor is not None:
            return lambda: self.sam_predictor
        if not config.sam_checkpoint:
            return None

        def load():
            from .masks import load_sam_predictor

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
        return [prepare_reference(c, i, config.height, config.width, sam)
                for i, c in enumerate(concepts)]

    def _install(self, state: AttentionState, reference_layers: Sequence[str]) -> dict:
        original = self.unet.attn_processors
        procs, modified = {}, 0
        for key in original:
            name = key.removesuffix(".processor")
            if name.endswith("attn1") and any(name.startswith(p + ".") for p in reference_layers):
                procs[key] = MagicFaceAttnProcessor(name, state)
                modified += 1
            else:
                procs[key] = RecordingAttnProcessor(name, state)
        if modified == 0:
            raise ValueError(f"reference_layers {list(reference_layers)} match no "
                             "self-attention layer of this UNet")
        self.unet.set_attn_processor(procs)
        return original

    # -- sampling ---------------------------------------------------------------------
    def _validate(self, prompt, concepts, config) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if not isinstance(config, GenerationConfig):
            raise ValueError("config must be a GenerationConfig")
        if not isinstance(concepts, (list, tuple)):
            raise ValueError("concepts must be a list of Concept")
        seen = set()
        for i, c in enumerate(concepts):
            if not isinstance(c, Concept):
                raise ValueError(f"concepts[{i}] must be a Concept, got {type(c).__name__}")
            w = c.word.strip().lower()
            if w in seen:
                raise ValueError(f"concept word '{c.word}' is used by more than one concept")
            seen.add(w)

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
    ) -> MagicFaceResult:
        """Sample one image. `on_step(step, total)` runs after every step; an exception
        raised in it aborts the run (the UNet is left as it was) and propagates.

        `latents` (1, C, h, w) replaces the seeded z_T, and `reference_noise`
        (steps, N, C, h, w) the seeded reference-path noise (`reference_noise[i, j]`
        noises concept j's latent at step i), as diffusers' `latents=` does: with
        both, a run of another implementation can be reproduced. The K/V cache keys
        explicit noise by its content.
        """
        config = config or GenerationConfig()
        self._validate(prompt, concepts, config)
        config = config.resolve(len(concepts))
        concept_tokens = self.concept_tokens(prompt, concepts)
        f = self.vae_scale_factor
        shape = (self.unet.config.in_channels, config.height // f, config.width // f)
        if latents is not None and tuple(latents.shape) != (1, *shape):
            raise ValueError(f"latents must have shape {(1, *shape)}, "
                             f"got {tuple(latents.shape)}")
        if reference_noise is not None and tuple(reference_noise.shape) != (
                config.steps, len(concepts), *shape):
            raise ValueError(f"reference_noise must have shape "
                             f"{(config.steps, len(concepts), *shape)}, "
                             f"got {tuple(reference_noise.shape)}")
        refs = self.prepare_references(concepts, config)
        with self._lock:
            if config.fast_path and supports_fast_ddim(self.make_scheduler(config)):
                out, maps, hits, misses = self._fast.sample(
                    prompt, refs, concept_tokens, config, on_step, self.kv_cache,
                    self.use_cuda_graphs, latents=latents, reference_noise=reference_noise)
                return MagicFaceResult(
                    image=self.decode(out), semantic_maps=maps, latents=out,
                    concept_tokens=concept_tokens,
                    rsa_steps=self.rsa_steps(config) if refs else 0,
                    masks=[r.mask for r in refs], cache_hits=hits, cache_misses=misses,
                    config=config)
            return self._sample(prompt, refs, concept_tokens, config, on_step, latents,
                                reference_noise)

    @staticmethod
    def rsa_steps(config: GenerationConfig) -> int:
        """Leading RSA steps of a resolved config. The authors' code makes no semantic
        map without CFG (it is computed in the guidance branch), so under that preset
        a call without CFG runs RSA throughout."""
        if config.preset == "authors" and config.guidance_scale <= 1.0:
            return config.steps
        return config.rsa_steps

    @staticmethod
    def wants_foreground(config: GenerationConfig) -> bool:
        """Whether the map needs the uncond branch's foreground (with CFG only)."""
        return config.guidance_scale > 1.0 and bool(config.foreground_mask
                                                     or config.region_guidance)

    def make_scheduler(self, config: GenerationConfig):
        """A fresh DDIM scheduler: the checkpoint's settings, or the one the authors'
        code runs with, keeping the checkpoint's prediction type. Their script builds
        DDIM with SD's betas and steps_offset 0, but diffusers' StableDiffusionPipeline
        constructor rewrites steps_offset to 1 (a deprecation fix-up), so what runs is
        steps_offset 1: timesteps 981..1 at 50 steps, as SD's own checkpoints say."""
        from diffusers import DDIMScheduler

        if config.resolve(0).ddim_schedule == "authors":
            return DDIMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                prediction_type=self.scheduler.config.get("prediction_type", "epsilon"))
        return type(self.scheduler).from_config(self.scheduler.config)

    def initial_state(self, config: GenerationConfig, latents: torch.Tensor | None = None):
        """The config's DDIM scheduler set to `config.steps`, the latent grid, and z_T:
        `latents` when given, else drawn as diffusers draws it from a CPU generator
        seeded with `config.seed`."""
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = self.make_scheduler(config)
        scheduler.set_timesteps(config.steps, device=self.device)
        f = self.vae_scale_factor
        latent_hw = (config.height // f, config.width // f)
        if latents is None:
            generator = torch.Generator("cpu").manual_seed(config.seed)
            latents = randn_tensor((1, self.unet.config.in_channels, *latent_hw),
                                   generator=generator, device=self.device, dtype=self.dtype)
        latents = latents.to(device=self.device, dtype=self.dtype)
        return scheduler, latent_hw, latents * scheduler.init_noise_sigma

    def _sample(self, prompt, refs, concept_tokens, config, on_step, latents=None,
                reference_noise=None):
        """The plain reference loop: diffusers' scheduler, explicit maps, no cache."""
        dtype = self.unet.dtype
        n = len(refs)
        do_cfg = config.guidance_scale > 1.0
        target_rows = 2 if do_cfg else 1

        embeds = self.unet_embeddings(prompt, config.negative_prompt, do_cfg,
                                      [r.prompt for r in refs])

        scheduler, latent_hw, latents = self.initial_state(config, latents)
        timesteps = scheduler.timesteps

        state, original, noisy_refs = None, None, None
        map_hw = level_grid(latent_hw, config.map_downscale)
        fore = self.wants_foreground(config)
        if n:
            ref_latents = encode_latents(self.vae, torch.cat([r.pixels for r in refs]))
            ref_seed = config.seed if config.reference_seed is None else config.reference_seed
            noisy_refs = noised_reference_latents(scheduler, ref_latents.to(dtype), timesteps,
                                                  ref_seed, noise=reference_noise)
            state = AttentionState(
                latent_hw=latent_hw, target_rows=target_rows, cond_row=target_rows - 1,
                weights=[r.weight for r in refs], masks=[r.mask for r in refs],
                map_hw=map_hw, ref_rows=[target_rows + i for i in range(n)],
                map_rows=(0, 1) if fore else (),
            )
            original = self._install(state, config.reference_layers)
        tables = self.token_tables(prompt, concept_tokens, config, self.device) if n else None
        rsa_steps = self.rsa_steps(config)
        maps: list[torch.Tensor] = []
        try:
            for i, t in enumerate(timesteps):
                inp = torch.cat([latents] * target_rows)
                inp = scheduler.scale_model_input(inp, t)
                if state is not None:
                    state.mode = "rsa" if i < rsa_steps else "rba"
                    # A map is needed from the last RSA step on (it drives the next
                    # step's RBA), and at every step for region guidance or when the
                    # caller wants them all.
                    state.record_maps = (config.return_semantic_maps or config.region_guidance
                                         or i >= rsa_steps - 1)
                    state.reset_maps()
                    inp = torch.cat([inp, scheduler.scale_model_input(noisy_refs[i], t)])
                eps = self.unet(inp, t, encoder_hidden_states=embeds, return_dict=False)[0]
                eps = eps[:target_rows]

                hits = foreground = None
                if state is not None and state.record_maps:
                    cross, selfs, grids = state.recorded_maps()
                    hits, labels, foreground = semantic_regions(
                        cross, selfs, grids, map_hw, tables,
                        refinement=config.map_refinement, aggregation=config.map_aggregation,
                        foreground=fore, foreground_mask=bool(config.foreground_mask))
                    state.set_labels(labels)
                    if config.return_semantic_maps:
                        maps.append(labels)
                if do_cfg:
                    eps_u, eps_c = eps.chunk(2)
                    if config.region_guidance and hits is not None:
                        noise_pred = region_adaptive_cfg(
                            eps_u, eps_c, config.guidance_scale, hits, foreground,
                            config.region_guidance_min, config.region_guidance_max,
                            config.region_guidance_cap)
                    else:
                        noise_pred = cfg(eps_u, eps_c, config.guidance_scale)
                else:
                    noise_pred = eps
                latents = scheduler.step(noise_pred, t, latents, eta=0.0,
                                         return_dict=False)[0]
                if on_step is not None:
                    on_step(i + 1, len(timesteps))
        finally:
            if original is not None:
                self.unet.set_attn_processor(original)

        image = self.decode(latents)
        return MagicFaceResult(
            image=image,
            semantic_maps=[m.cpu() for m in maps],
            latents=latents,
            concept_tokens=concept_tokens,
            rsa_steps=rsa_steps if n else 0,
            masks=[r.mask for r in refs],
            config=config,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                            return_dict=False)[0]
        x = (x / 2 + 0.5).clamp(0, 1)
        arr = x.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        return Image.fromarray((arr * 255).round().astype(np.uint8))
