"""The peer baseline: MagicFace computed the way the authors' research code lays it
out (re-implemented here from the design note's description, not copied):

- fp32 everywhere, explicit attention (scores materialised, softmax, matmul);
- batch 2(1+N): each CFG half carries the target *and* every reference row, so the
  reference path runs twice per step;
- the target rows of both halves attend to [K ; K_refs] with the mask bias at the
  modified layers; attention maps are recorded for the semantic map every step;
- diffusers' DDIMScheduler.step (host-synchronising) in a plain Python loop.

It produces MagicFace-shaped work for timing; its images are not checked.
"""

from __future__ import annotations

import torch

from magicface_core.attention import masks_for_grid, rsa_bias
from magicface_core.reference import encode_latents, noised_reference_latents
from magicface_core.sampling.prepare import encode_prompt, prompt_positions
from magicface_core.segmentation import latent_semantic_map
from magicface_core.unet_layout import grid_for_tokens, is_reference_layer


class ExplicitAttnProcessor:
    def __init__(self, name: str, ctx: dict, modified: bool):
        self.name, self.ctx, self.modified = name, ctx, modified
        self.block = name.rsplit(".", 1)[0]
        self.is_cross = name.endswith("attn2")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        ctx = self.ctx
        b, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        h = attn.heads
        scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype,
                                           device=q.device), q, k.transpose(-1, -2),
                               beta=0, alpha=attn.scale)
        probs = scores.softmax(-1)
        out = torch.bmm(probs, v)
        n = ctx["n"]
        half = 1 + n
        grid = grid_for_tokens(length, ctx["latent_hw"]) if not self.is_cross else None
        if self.modified and n:
            bias = ctx["bias"][grid]
            for row in (0, half):  # the target row of each CFG half
                ks = torch.cat([k[(row + j) * h:(row + j + 1) * h] for j in range(half)], 1)
                vs = torch.cat([v[(row + j) * h:(row + j + 1) * h] for j in range(half)], 1)
                s = torch.bmm(q[row * h:(row + 1) * h], ks.transpose(-1, -2)) * attn.scale
                p = (s + bias).softmax(-1)
                out[row * h:(row + 1) * h] = torch.bmm(p, vs)
        if length <= ctx["map_tokens"]:
            cond = probs[half * h:(half + 1) * h].mean(0)
            (ctx["cross"] if self.is_cross else ctx["self"])[self.block] = cond
        out = attn.batch_to_head_dim(out)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def run_authors_pattern(pipe, prompt, refs, concept_tokens, config):
    """One image with the authors' compute pattern; `refs` are PreparedReference."""
    from diffusers import DDIMScheduler

    unet, vae = pipe.unet, pipe.vae
    device = pipe.device
    n = len(refs)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(config.steps, device=device)
    f = pipe.vae_scale_factor
    latent_hw = (config.height // f, config.width // f)
    map_hw = (latent_hw[0] // 2, latent_hw[1] // 2)
    g = torch.Generator("cpu").manual_seed(config.seed)
    latents = torch.randn(1, 4, *latent_hw, generator=g).to(device)
    ref_lat = encode_latents(vae, torch.cat([r.pixels for r in refs]))
    noisy = noised_reference_latents(sched, ref_lat, sched.timesteps, config.seed)
    uncond = encode_prompt(pipe.text_encoder, pipe.tokenizer, [""] * (1 + n), device,
                           pipe.dtype)
    cond = encode_prompt(pipe.text_encoder, pipe.tokenizer, [prompt] + [r.prompt for r in refs],
                         device, pipe.dtype)
    embeds = torch.cat([uncond, cond])
    ctx = {"n": n, "latent_hw": latent_hw, "map_tokens": map_hw[0] * map_hw[1],
           "cross": {}, "self": {}, "bias": {}}
    h, w = latent_hw
    for _ in range(4):
        masks = masks_for_grid([r.mask for r in refs], (h, w), device)
        ctx["bias"][(h, w)] = rsa_bias(h * w, masks, [r.weight for r in refs],
                                       dtype=latents.dtype, device=device)
        h, w = (h + 1) // 2, (w + 1) // 2
    original = unet.attn_processors
    procs = {}
    for key in original:
        name = key.removesuffix(".processor")
        procs[key] = ExplicitAttnProcessor(name, ctx,
                                           is_reference_layer(name, config.reference_layers))
    unet.set_attn_processor(procs)
    positions = prompt_positions(pipe.tokenizer, prompt)
    try:
        for i, t in enumerate(sched.timesteps):
            ctx["cross"].clear()
            ctx["self"].clear()
            half = torch.cat([latents, noisy[i]])
            eps = unet(torch.cat([half, half]), t, encoder_hidden_states=embeds).sample
            eps_u, eps_c = eps[0:1], eps[1 + n:2 + n]
            blocks = [b for b in ctx["cross"] if b in ctx["self"]]
            cross = [ctx["cross"][b] for b in blocks]
            latent_semantic_map(cross, [ctx["self"][b] for b in blocks], concept_tokens,
                                map_hw, grids=[grid_for_tokens(c.shape[0], latent_hw)
                                               for c in cross], candidate_tokens=positions)
            pred = eps_u + config.guidance_scale * (eps_c - eps_u)
            latents = sched.step(pred, t, latents, eta=0.0).prev_sample
    finally:
        unet.set_attn_processor(original)
    return pipe.decode(latents)
