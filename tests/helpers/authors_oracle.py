"""An independent re-derivation of the authors' MagicFace pipeline, for parity tests.

Written from the formulas their code computes (see docs/DECISIONS.md, "Preset
authors"), in their compute pattern rather than ours: one UNet batch of 2(1+N) rows
([uncond target, uncond refs, cond target, cond refs]), explicit fp32 softmax
attention in every layer, attention maps kept per layer for the rows of the two
target branches, RBA as a loop over concepts that overwrites the regions it owns,
diffusers' DDIMScheduler.step. It shares no code with magicface_core's attention,
segmentation or guidance modules, so agreement tests the library, not itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODIFIED_BLOCKS = range(10, 16)  # transformer blocks 10..15 in execution order


@dataclass
class OracleConcept:
    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor  # (H, W) bool
    weight: float
    reference_prompt: str
    tokens: list[int]  # the concept word's positions in the prompt


def smoothing_kernel() -> torch.Tensor:
    # Their 3x3 smoothing, sigma 0.5: per axis exp(-((x - 1) / (2 * 0.5))^2), normalised.
    axis = torch.tensor([math.exp(-1.0), 1.0, math.exp(-1.0)])
    k = torch.outer(axis, axis)
    return (k / k.sum())[None, None]


def smooth_planes(x: torch.Tensor) -> torch.Tensor:
    """(P, h, w) -> (P, h, w), each plane reflect-padded by 1 and smoothed."""
    y = F.pad(x[:, None].float(), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(y, smoothing_kernel())[:, 0]


class _Processor:
    def __init__(self, oracle: Oracle):
        self.o = oracle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        o = self.o
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        b, length, _ = hidden_states.shape
        h = attn.heads

        def heads(x):
            return x.reshape(b, x.shape[1], h, -1).permute(0, 2, 1, 3).float()

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(ctx)), heads(attn.to_v(ctx))
        probs = (torch.einsum("bhid,bhjd->bhij", q, k) * attn.scale).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", probs, v)
        side = int(round(length**0.5))
        half = b // 2
        if o.latent_side // side >= 2:  # layers at latent/2 and coarser feed the map
            kept = probs[[0, half]].mean(dim=1)  # (uncond target, cond target)
            (o.step_cross if is_cross else o.step_self).append(kept)
        # Blocks are counted in execution order (attn1, attn2 per transformer block).
        block = o.calls // 2
        o.calls += 1
        if not is_cross and block in MODIFIED_BLOCKS and o.concepts:
            out[half] = o.modified_attention(q[half], k, v, half, side, attn.scale)
        out = out.permute(0, 2, 1, 3).reshape(b, length, -1).to(hidden_states.dtype)
        return attn.to_out[0](out)


class Oracle:
    def __init__(self, pipe):
        self.pipe = pipe
        self.concepts: list[OracleConcept] = []

    # -- attention of the cond target row at a modified layer --------------------------
    def _key_bias(self, j: int, side: int) -> torch.Tensor:
        c = self.concepts[j]
        m = F.interpolate(c.mask[None, None].float(), size=(side, side), mode="nearest")
        m = m.flatten() > 0
        return torch.where(m, torch.tensor(float(c.weight)), torch.tensor(float("-inf")))

    def modified_attention(self, q, k, v, row, side, scale):
        n = len(self.concepts)
        own_k, own_v = k[row], v[row]
        ref_k = [k[row + 1 + j] for j in range(n)]
        ref_v = [v[row + 1 + j] for j in range(n)]
        length = side * side
        if self.rba and self.labels is not None:  # RBA: a loop over concepts
            out = torch.einsum("hij,hjd->hid", (q @ own_k.transpose(-1, -2) * scale)
                               .softmax(-1), own_v)
            regions = F.interpolate(self.labels[None].float(), size=(side, side),
                                    mode="nearest")[0]
            for j in range(n):
                sel = regions[j].flatten() > 0
                if not sel.any():
                    continue
                keys = torch.cat([own_k, ref_k[j]], dim=1)
                vals = torch.cat([own_v, ref_v[j]], dim=1)
                bias = torch.cat([torch.zeros(length), self._key_bias(j, side)])
                s = q[:, sel] @ keys.transpose(-1, -2) * scale + bias
                out[:, sel] = s.softmax(-1) @ vals  # later concepts overwrite earlier ones
            return out
        keys = torch.cat([own_k, *ref_k], dim=1)  # RSA: every reference at once
        vals = torch.cat([own_v, *ref_v], dim=1)
        bias = torch.cat([torch.zeros(length)] + [self._key_bias(j, side) for j in range(n)])
        return (q @ keys.transpose(-1, -2) * scale + bias).softmax(-1) @ vals

    # -- the semantic map -------------------------------------------------------------
    def semantic_map(self, ca_scale: float):
        grid = self.latent_side // 2
        tok_sum, pair_sum = 0, 0
        for cross, selfm in zip(self.step_cross, self.step_self, strict=True):
            s = selfm
            refined = ((s + s @ s + s @ s + s @ s) / 4) @ cross  # (2, L, 77)
            side = int(round(refined.shape[1] ** 0.5))
            maps = refined.transpose(1, 2).reshape(2, 77, side, side)
            if side != grid:
                maps = F.interpolate(maps, scale_factor=grid // side, mode="bilinear")
            maps = smooth_planes(maps.reshape(2 * 77, grid, grid)).reshape(2, 77, grid, grid)
            cond, uncond = maps[1], maps[0]
            tok_sum = tok_sum + cond / (cond.mean(dim=(1, 2), keepdim=True) + 1e-8)
            pair = torch.stack([uncond[0], uncond[1:].sum(0)])
            pair_sum = pair_sum + pair / pair.mean(dim=(1, 2), keepdim=True)
        n_layers = len(self.step_cross)
        tok, pair = tok_sum / n_layers, pair_sum / n_layers
        concept_token = torch.zeros(77, dtype=torch.bool)
        for c in self.concepts:
            concept_token[c.tokens] = True
        tok = torch.where(concept_token[:, None, None], tok, tok * ca_scale)
        hits = tok == tok.max(dim=0, keepdim=True).values  # (77, g, g), ties kept
        foreground = ~(pair[0] == torch.maximum(pair[0], pair[1]))
        if ca_scale < 0.9:
            hits = hits & foreground
        labels = torch.stack([hits[c.tokens].any(0) for c in self.concepts])  # (N, g, g)
        return hits, foreground, labels

    def guidance_rate(self, eps_u, eps_c, hits, foreground, g):
        side = eps_u.shape[-1]
        norm = (eps_c - eps_u)[0].norm(dim=0)  # (H, W)
        up = F.interpolate(hits[None].float(), size=(side, side), mode="nearest")[0]
        fg = F.interpolate(foreground[None, None].float(), size=(side, side),
                           mode="nearest")[0, 0]
        fore_norm = (norm * fg).sum() / (fg.sum() + 1e-8)
        rate = torch.zeros(side, side)
        for t in range(77):
            area = up[t].sum()
            if area > 0:
                token_norm = (norm * up[t]).sum() / (area + 1e-8)
                rate = rate + up[t] * fore_norm / (token_norm + 1e-8)
        rate = rate.clamp(0.8, 3.0).clamp(max=15.0 / g)
        return smooth_planes(rate[None])[0]

    # -- the loop ---------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt, concepts: list[OracleConcept], z_t, noise, *, steps, alpha,
                 ca_scale, negative_prompt, guidance_scale=7.5):
        from diffusers import DDIMScheduler

        pipe, unet = self.pipe, self.pipe.unet
        self.concepts, self.labels, self.rba = concepts, None, False
        self.latent_side = z_t.shape[-1]
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        sched.set_timesteps(steps)
        n = len(concepts)
        z0 = torch.cat([pipe.vae.encode(c.pixels).latent_dist.mean * 0.18215 for c in concepts])
        ids = pipe.tokenizer([negative_prompt] * (1 + n) + [prompt]
                             + [c.reference_prompt for c in concepts], padding="max_length",
                             max_length=77, truncation=True, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
        before = dict(unet.attn_processors)
        unet.set_attn_processor({name: _Processor(self) for name in before})
        latents = z_t.clone()
        try:
            for i, t in enumerate(sched.timesteps):
                refs = sched.add_noise(z0, noise[i], t.reshape(1))
                x = torch.cat([latents, refs])
                self.step_cross, self.step_self, self.calls = [], [], 0
                self.rba = i > int(alpha * steps)
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
                eps_u, eps_c = eps[:1], eps[1 + n : 2 + n]
                hits, foreground, self.labels = self.semantic_map(ca_scale)
                rate = self.guidance_rate(eps_u, eps_c, hits, foreground, guidance_scale)
                pred = eps_u + guidance_scale * rate * (eps_c - eps_u)
                latents = sched.step(pred, t, latents).prev_sample
        finally:
            unet.set_attn_processor(before)
        return latents
