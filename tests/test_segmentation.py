"""The latent semantic map on planted attention maps."""

from __future__ import annotations

import pytest
import torch

from magicface_core.segmentation import latent_semantic_map, token_scores

T = 6  # tokens: 0 <start>, 1 "a", 2 concept-1 word, 3 "with", 4..5 concept 2 (two pieces)


def planted(grid=8, hole=(1, 1), strength=8.0):
    """Concept 1 on the top-left quadrant, concept 2 on the bottom-right, background
    ("a") elsewhere, and one pixel of the top-left quadrant (the hole) whose
    cross-attention points at the background."""
    h = w = grid
    logits = torch.zeros(h, w, T)
    logits[..., 0] = 2.0  # <start> takes a lot everywhere, as in real CLIP maps
    logits[..., 1] = strength / 2
    half = grid // 2
    logits[:half, :half, 2] = strength
    logits[half:, half:, 4] = strength
    logits[half:, half:, 5] = strength - 1
    logits[hole[0], hole[1], :] = 0
    logits[hole[0], hole[1], 1] = strength
    cross = logits.reshape(h * w, T).softmax(-1)
    # Self-attention: each pixel attends to its 3x3 neighbourhood within its own
    # region (self-attention follows object boundaries).
    idx = torch.arange(h * w)
    ys, xs = idx // w, idx % w
    region = expected(grid).reshape(-1)
    near = ((ys[:, None] - ys[None]).abs() <= 1) & ((xs[:, None] - xs[None]).abs() <= 1)
    near &= region[:, None] == region[None]
    selfm = near.float() / near.float().sum(-1, keepdim=True)
    return cross, selfm


def expected(grid=8):
    lab = torch.zeros(grid, grid, dtype=torch.long)
    half = grid // 2
    lab[:half, :half] = 1
    lab[half:, half:] = 2
    return lab


def test_planted_regions_are_recovered_and_the_hole_is_filled():
    cross, selfm = planted()
    ident = torch.eye(64)
    # Without self-attention refinement the hole stays background...
    unrefined = latent_semantic_map([cross], [ident], [[2], [4, 5]], size=8,
                                    candidate_tokens=[1, 2, 3, 4, 5])
    assert unrefined[1, 1] == 0
    # ...with it (Eq. 3) the neighbourhood fills it in.
    labels = latent_semantic_map([cross], [selfm], [[2], [4, 5]], size=8,
                                 candidate_tokens=[1, 2, 3, 4, 5])
    assert labels.dtype == torch.long and labels.shape == (8, 8)
    assert torch.equal(labels, expected())


def test_layers_of_several_resolutions_are_upsampled_and_averaged():
    c8, s8 = planted(grid=8)
    c4, s4 = planted(grid=4, hole=(0, 0))
    labels = latent_semantic_map([c8, c4], [s8, s4], [[2], [4, 5]], size=8,
                                 candidate_tokens=[1, 2, 3, 4, 5])
    # The border between regions may shift by the bilinear blur; the region cores don't.
    exp = expected()
    core = torch.zeros(8, 8, dtype=torch.bool)
    core[:3, :3] = core[5:, 5:] = core[:3, 5:] = core[5:, :3] = True
    assert torch.equal(labels[core], exp[core])


def test_channels_are_renormalised_over_space():
    cross, selfm = planted()
    scores = token_scores([cross], [selfm], 8)
    assert scores.shape == (T, 8, 8)
    torch.testing.assert_close(scores.sum(dim=(-2, -1)), torch.ones(T))


def test_ca_scale_down_weights_non_concept_tokens():
    cross, selfm = planted(strength=3.0)
    base = latent_semantic_map([cross], [selfm], [[2], [4, 5]], size=8)
    scaled = latent_semantic_map([cross], [selfm], [[2], [4, 5]], size=8, ca_scale=0.01)
    assert (scaled > 0).sum() > (base > 0).sum()


def test_non_square_grids():
    h, w = 4, 6
    cross = torch.full((h * w, 3), 0.1)
    cross[:, 0] = 1.0
    cross.view(h, w, 3)[:, 3:, 2] = 5.0
    labels = latent_semantic_map([cross.softmax(-1)], [torch.eye(h * w)], [[2]], size=(h, w),
                                 grids=[(h, w)], candidate_tokens=[1, 2])
    assert labels.shape == (h, w)
    assert (labels[:, 3:] == 1).all() and (labels[:, :3] == 0).all()


def test_bad_inputs():
    cross, selfm = planted()
    with pytest.raises(ValueError, match="no attention maps"):
        latent_semantic_map([], [], [[2]])
    with pytest.raises(ValueError, match="self map"):
        latent_semantic_map([cross], [selfm[:10, :10]], [[2]], size=8)
    with pytest.raises(ValueError, match="out of range"):
        latent_semantic_map([cross], [selfm], [[99]], size=8)


@pytest.mark.parametrize("heads,length,d", [(1, 16, 4), (3, 64, 8), (8, 256, 80)])
def test_self_attention_refinement_without_forming_the_map(heads, length, d):
    from magicface_core.segmentation import refine_by_self_attention

    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, heads, length, d, generator=g) * 2
    k = torch.randn(1, heads, length, d, generator=g) * 2
    cross = torch.rand(length, 77, generator=g).softmax(dim=-1)
    scale = d**-0.5
    s = (q[0].double() @ k[0].double().transpose(-1, -2) * scale).softmax(-1).mean(0)
    want = s @ cross.double()
    got = refine_by_self_attention(cross, q.half(), k.half(), scale)
    assert got.dtype == torch.float32 and got.shape == (length, 77)
    # fp16 inputs are upcast, so the product is the fp32 one, not an fp16 one.
    s16 = (q[0].half().double() @ k[0].half().double().transpose(-1, -2) * scale).softmax(-1)
    torch.testing.assert_close(got.double(), s16.mean(0) @ cross.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), want, atol=5e-3, rtol=5e-2)
    with pytest.raises(ValueError, match="does not match"):
        refine_by_self_attention(cross[:-1], q, k, scale)
