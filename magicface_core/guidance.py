"""Classifier-free guidance, plain and region-adaptive."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .segmentation import smooth

__all__ = ["cfg", "region_guidance_rate", "region_adaptive_cfg"]


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def region_guidance_rate(
    delta: torch.Tensor,
    hits: torch.Tensor,
    foreground: torch.Tensor,
    scale,
    lo: float = 0.8,
    hi: float = 3.0,
    cap: float = 15.0,
) -> torch.Tensor:
    """Per-pixel guidance rate of the authors' region-adaptive CFG: (1, 1, H, W), fp32.

    `delta` = eps_cond - eps_uncond (1, C, H, W); `hits` (T, h, w) the per-token
    regions of the semantic map and `foreground` (h, w) its foreground, both on the
    map grid (nearest-upsampled to H x W here). Token t's region gets rate
    m_fg / m_t, where m is the mean of |delta| (norm over channels) over the
    foreground and over the region: regions the prompt pulls weakly are pushed
    harder. A pixel's rate is the sum over the regions holding it (0 in none),
    clamped to [lo, hi] and to at most cap / scale, then smoothed (3x3, reflect).
    """
    hw = delta.shape[-2:]
    norm = delta.float().norm(dim=1)  # (1, H, W)
    regions = F.interpolate(hits[None].float(), size=hw, mode="nearest")[0]  # (T, H, W)
    fg = F.interpolate(foreground[None, None].float(), size=hw, mode="nearest")[0]  # (1,H,W)
    area = regions.sum(dim=(-2, -1))
    token_norm = (norm * regions).sum(dim=(-2, -1)) / (area + 1e-8)
    fore_norm = (norm * fg).sum(dim=(-2, -1)) / (fg.sum(dim=(-2, -1)) + 1e-8)
    rate_t = fore_norm * (area > 0).float() / (token_norm + 1e-8)  # (T,)
    rate = (rate_t[:, None, None] * regions).sum(dim=0, keepdim=True)  # (1, H, W)
    rate = rate.clamp(lo, hi)
    limit = cap / scale  # a device tensor in the fast loop: no host value is read
    rate = torch.minimum(rate, limit) if isinstance(limit, torch.Tensor) else rate.clamp(
        max=limit)
    return smooth(rate[None])


def region_adaptive_cfg(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    scale,
    hits: torch.Tensor,
    foreground: torch.Tensor,
    lo: float = 0.8,
    hi: float = 3.0,
    cap: float = 15.0,
) -> torch.Tensor:
    """eps_u + scale * rate * (eps_c - eps_u) with `region_guidance_rate`'s rate."""
    delta = eps_cond - eps_uncond
    rate = region_guidance_rate(delta, hits, foreground, scale, lo, hi, cap).to(delta.dtype)
    return eps_uncond + scale * rate * delta
