"""Everything a sampling loop needs, made once per call before the first step: the
scheduler and its timesteps, the grids, z_T, the text embeddings, the semantic map's
token tables, and how the references are noised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import GenerationConfig
from ..models import Components
from ..reference import PreparedReference, encode_latents, noised_reference_latents
from ..segmentation import token_tables
from ..unet_layout import level_grid

__all__ = ["PreparedCall", "prepare_call", "make_scheduler", "encode_prompt",
           "noisy_references", "rsa_steps", "wants_foreground", "needs_map"]

Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_scheduler(template, config: GenerationConfig):
    """A fresh DDIM scheduler: the checkpoint's settings, or the one the authors' code
    runs with, keeping the checkpoint's prediction type. Their script builds DDIM with
    SD's betas and steps_offset 0, but diffusers' StableDiffusionPipeline constructor
    rewrites steps_offset to 1 (a deprecation fix-up), so what runs is steps_offset 1:
    timesteps 981..1 at 50 steps, as SD's own checkpoints say."""
    from diffusers import DDIMScheduler

    if config.resolve(0).ddim_schedule == "authors":
        return DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
            prediction_type=template.config.get("prediction_type", "epsilon"))
    return type(template).from_config(template.config)


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompts: Sequence[str], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """CLIP last hidden states, (B, 77, D), as StableDiffusionPipeline encodes them."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).long().to(text_encoder.device)
    out = text_encoder(ids.to(text_encoder.device), attention_mask=mask)[0]
    return out.to(dtype=dtype, device=device)


def prompt_positions(tokenizer, prompt: str) -> list[int]:
    """The prompt's own token positions: after <start>, before <end> and padding."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return list(range(1, max(2, len(ids) - 1)))


def rsa_steps(config: GenerationConfig) -> int:
    """Leading RSA steps of a resolved config. The authors' code makes no semantic map
    without CFG (it is computed in the guidance branch), so under that preset a call
    without CFG runs RSA throughout."""
    if config.preset == "authors" and config.guidance_scale <= 1.0:
        return config.steps
    return config.rsa_steps


def needs_map(call: PreparedCall, step: int) -> bool:
    """Whether step `step` needs the semantic map: from the last RSA step on (it drives
    the next step's RBA), and at every step for region guidance or when every step's
    map is kept."""
    c = call.config
    return bool(c.return_semantic_maps or c.region_guidance
                or step >= call.rsa_steps - 1)


def wants_foreground(config: GenerationConfig) -> bool:
    """Whether the map needs the uncond branch's foreground (with CFG only)."""
    return config.guidance_scale > 1.0 and bool(config.foreground_mask
                                                 or config.region_guidance)


@dataclass
class PreparedCall:
    """One call's inputs, as the numbered steps of diffusers' StableDiffusionPipeline
    make them. `config` is resolved (no field left to the preset)."""

    prompt: str
    config: GenerationConfig
    refs: list[PreparedReference]
    concept_tokens: list[list[int]]
    scheduler: object  # a DDIMScheduler set to config.steps
    timesteps: torch.Tensor  # (steps,)
    latent_hw: tuple[int, int]
    map_hw: tuple[int, int]
    latents: torch.Tensor  # z_T, (1, C, h, w)
    prompt_embeds: torch.Tensor  # (target rows, 77, D): [negative,] prompt
    reference_embeds: torch.Tensor | None  # (N, 77, D): each concept's reference prompt
    tables: Tables | None  # the semantic map's (bias, scale, label_of), (77,) each
    rsa_steps: int
    foreground: bool  # the map reads the uncond row for its foreground
    reference_seed: int
    reference_noise: torch.Tensor | None  # explicit (steps, N, C, h, w), or seeded draws

    @property
    def n(self) -> int:
        return len(self.refs)

    @property
    def do_cfg(self) -> bool:
        return self.config.guidance_scale > 1.0

    @property
    def target_rows(self) -> int:
        return 2 if self.do_cfg else 1


def prepare_call(c: Components, prompt: str, refs: list[PreparedReference],
                 concept_tokens: list[list[int]], config: GenerationConfig, *,
                 device: torch.device, dtype: torch.dtype,
                 latents: torch.Tensor | None = None,
                 reference_noise: torch.Tensor | None = None) -> PreparedCall:
    from diffusers.utils.torch_utils import randn_tensor

    # 1. The scheduler and its timesteps.
    scheduler = make_scheduler(c.scheduler, config)
    scheduler.set_timesteps(config.steps, device=device)
    # 2. The latent grid and the semantic map's grid.
    f = 2 ** (len(c.vae.config.block_out_channels) - 1)
    latent_hw = (config.height // f, config.width // f)
    map_hw = level_grid(latent_hw, config.map_downscale)
    # 3. z_T: given, or drawn as diffusers draws it from a CPU generator (any device).
    if latents is None:
        generator = torch.Generator("cpu").manual_seed(config.seed)
        latents = randn_tensor((1, c.unet.config.in_channels, *latent_hw),
                               generator=generator, device=device, dtype=dtype)
    latents = latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
    # 4. Text embeddings: [negative,] prompt for the target, then the reference prompts.
    do_cfg = config.guidance_scale > 1.0
    cond = encode_prompt(c.text_encoder, c.tokenizer, [prompt], device, dtype)
    prompt_embeds = (torch.cat([encode_prompt(c.text_encoder, c.tokenizer,
                                              [config.negative_prompt], device, dtype), cond])
                     if do_cfg else cond)
    reference_embeds = (encode_prompt(c.text_encoder, c.tokenizer, [r.prompt for r in refs],
                                      device, dtype) if refs else None)
    # 5. The semantic map's token tables.
    tables = None
    if refs:
        candidates = (None if config.map_tokens == "all"
                      else prompt_positions(c.tokenizer, prompt))
        tables = token_tables(c.tokenizer.model_max_length, concept_tokens, candidates,
                              config.ca_scale, device=device)
    return PreparedCall(
        prompt=prompt, config=config, refs=refs, concept_tokens=concept_tokens,
        scheduler=scheduler, timesteps=scheduler.timesteps, latent_hw=latent_hw,
        map_hw=map_hw, latents=latents, prompt_embeds=prompt_embeds,
        reference_embeds=reference_embeds, tables=tables, rsa_steps=rsa_steps(config),
        foreground=wants_foreground(config),
        reference_seed=config.seed if config.reference_seed is None else config.reference_seed,
        reference_noise=reference_noise)


def noisy_references(vae, call: PreparedCall, indices: Sequence[int]) -> torch.Tensor | None:
    """The references `indices`, VAE-encoded and noised to every step's timestep:
    (steps, len(indices), C, h, w), or None for none."""
    if not indices:
        return None
    # Under model offload (accelerate's hook on the VAE) `encode` moves the VAE to the
    # execution device but not its input, which encode_latents places on `vae.device`:
    # run the hook first so that both are where the call runs.
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)
    z = encode_latents(vae, torch.cat([call.refs[i].pixels for i in indices]))
    return noised_reference_latents(call.scheduler, z.to(call.latents.dtype), call.timesteps,
                                    call.reference_seed, list(indices),
                                    noise=call.reference_noise)
