"""Region-adaptive guidance (the authors' use_rate) against a re-derivation."""

from __future__ import annotations

import numpy as np
import torch

from magicface_core.guidance import region_adaptive_cfg, region_guidance_rate
from magicface_core.segmentation import gaussian_kernel


def rate_by_hand(delta, hits, fg, g, lo=0.8, hi=3.0, cap=15.0):
    """Per pixel, with plain loops: every token region t holding the pixel adds
    mean|delta|(foreground) / mean|delta|(t); clamp, cap at cap/g, smooth."""
    d = delta[0].double().numpy()
    norm = np.sqrt((d**2).sum(0))
    big, small = norm.shape[0], hits.shape[-1]
    f = big // small
    up = np.repeat(np.repeat(hits.numpy(), f, 1), f, 2).astype(float)
    fgu = np.repeat(np.repeat(fg.numpy(), f, 0), f, 1).astype(float)
    fore = (norm * fgu).sum() / (fgu.sum() + 1e-8)
    rate = np.zeros_like(norm)
    for t in range(up.shape[0]):
        if up[t].sum() > 0:
            rate += up[t] * fore / ((norm * up[t]).sum() / (up[t].sum() + 1e-8) + 1e-8)
    rate = np.minimum(np.clip(rate, lo, hi), cap / g)
    a = np.pad(rate, 1, mode="reflect")
    k = gaussian_kernel().double().numpy()
    return np.array([[(a[i:i + 3, j:j + 3] * k).sum() for j in range(big)] for i in range(big)])


def test_rate_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(1, 4, 16, 16, generator=g)
    delta[..., :8, :8] *= 3  # a region the prompt pulls harder
    hits = torch.zeros(77, 8, 8, dtype=torch.bool)
    hits[0, 4:, :] = True  # <start>: bottom half
    hits[2, :4, :4] = True
    hits[5, :4, 4:] = True
    hits[5, 3, 3] = True  # a tie: this pixel is in two regions, their rates add
    fg = torch.zeros(8, 8, dtype=torch.bool)
    fg[:4] = True
    for scale in (7.5, 2.0):
        got = region_guidance_rate(delta, hits, fg, scale)
        want = rate_by_hand(delta, hits, fg, scale)
        assert got.shape == (1, 1, 16, 16)
        np.testing.assert_allclose(got[0, 0].double().numpy(), want, rtol=1e-5, atol=1e-6)
    # The cap: at scale 7.5 no pixel's rate exceeds 15 / 7.5 = 2 (before smoothing).
    assert float(region_guidance_rate(delta, hits, fg, 7.5).max()) <= 2.0 + 1e-6


def test_pixels_in_no_region_get_the_lower_clamp():
    delta = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hits = torch.zeros(77, 4, 4, dtype=torch.bool)
    fg = torch.ones(4, 4, dtype=torch.bool)
    rate = region_guidance_rate(delta, hits, fg, 7.5)
    torch.testing.assert_close(rate, torch.full_like(rate, 0.8))


def test_cfg_uses_the_rate():
    g = torch.Generator().manual_seed(2)
    u, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    hits = torch.zeros(77, 4, 4, dtype=torch.bool)
    hits[3, :2] = True
    hits[0, 2:] = True
    fg = torch.zeros(4, 4, dtype=torch.bool)
    fg[:2] = True
    out = region_adaptive_cfg(u, c, 7.5, hits, fg)
    rate = region_guidance_rate(c - u, hits, fg, 7.5)
    torch.testing.assert_close(out, u + 7.5 * rate * (c - u))
    assert not torch.allclose(out, u + 7.5 * (c - u))
