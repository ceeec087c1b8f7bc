"""Classifier-free guidance, plain and region-adaptive."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cfg", "region_adaptive_cfg"]


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def region_adaptive_cfg(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    scale: float,
    labels: torch.Tensor,
    n_labels: int,
    lo: float = 0.5,
    hi: float = 2.0,
) -> torch.Tensor:
    """Guidance whose scale varies per semantic region (an S-CFG-style extra of the
    authors' code, off by default).

    `labels` holds values in [0, n_labels). Each region r gets rate m / m_r, clamped
    to [lo, hi], where m_r is the mean guidance magnitude |eps_c - eps_u| inside r
    and m the mean over the image:
    regions the prompt pulls weakly are pushed harder, so a small concept region is
    not washed out by the background.
    """
    delta = eps_cond - eps_uncond
    mag = delta.float().norm(dim=1, keepdim=True)  # (B, 1, h, w)
    lab = F.interpolate(labels[None, None].float(), size=mag.shape[-2:], mode="nearest")
    lab = lab.long().expand_as(mag)
    n = n_labels
    flat_lab, flat_mag = lab.reshape(lab.shape[0], -1), mag.reshape(mag.shape[0], -1)
    sums = torch.zeros(mag.shape[0], n, device=mag.device).scatter_add_(1, flat_lab, flat_mag)
    counts = torch.zeros(mag.shape[0], n, device=mag.device).scatter_add_(
        1, flat_lab, torch.ones_like(flat_mag))
    region_mean = sums / counts.clamp_min(1)
    overall = flat_mag.mean(dim=1, keepdim=True)
    rate = (overall / region_mean.clamp_min(1e-8)).clamp(lo, hi)
    per_pixel = rate.gather(1, flat_lab).reshape(mag.shape).to(delta.dtype)
    return eps_uncond + scale * per_pixel * delta
