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


# -- the authors' variants, each against a re-derivation from its formula ------------------
def test_smoothing_kernel_is_the_authors_form():
    from magicface_core.segmentation import gaussian_kernel

    # exp(-(x / (2 sigma))^2) per axis at x = -1, 0, 1 with sigma 0.5: e^-1, 1, e^-1.
    e = float(torch.exp(torch.tensor(-1.0)))
    axis = torch.tensor([e, 1.0, e]) / (1 + 2 * e)
    torch.testing.assert_close(gaussian_kernel(3, 0.5), torch.outer(axis, axis))
    torch.testing.assert_close(gaussian_kernel(3, 0.5).sum(), torch.tensor(1.0))


def test_smooth_reflect_pads_and_convolves():
    import numpy as np

    from magicface_core.segmentation import gaussian_kernel, smooth

    x = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel().numpy()
    want = np.zeros((2, 5, 6))
    for p in range(2):
        a = np.pad(x[p].numpy(), 1, mode="reflect")  # reflect: edge not repeated
        for i in range(5):
            for j in range(6):
                want[p, i, j] = (a[i:i + 3, j:j + 3] * k).sum()
    torch.testing.assert_close(smooth(x), torch.from_numpy(want).float())


@pytest.mark.parametrize("rows", [1, 2])
def test_s_plus_3s2_refinement_with_and_without_forming_s(rows):
    from magicface_core.segmentation import refine, refine_by_self_attention

    g = torch.Generator().manual_seed(rows)
    q, k = torch.randn(rows, 3, 16, 4, generator=g), torch.randn(rows, 3, 16, 4, generator=g)
    cross = torch.rand(rows, 16, 77, generator=g).softmax(-1)
    s = (q.double() @ k.double().transpose(-1, -2) * 0.5).softmax(-1).mean(1)
    # Their loop: S, plus S @ S three times, over four.
    want = ((s + s @ s + s @ s + s @ s) / 4) @ cross.double()
    torch.testing.assert_close(refine(cross, s.float(), "s+3s2").double(), want, atol=1e-6,
                               rtol=1e-5)
    got = refine_by_self_attention(cross, q, k, 0.5, refinement="s+3s2")
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="refinement"):
        refine(cross, s.float(), "s3")


def test_smooth_meannorm_aggregation_and_foreground():
    import numpy as np

    from magicface_core.segmentation import aggregate, gaussian_kernel

    g = torch.Generator().manual_seed(3)
    fine = torch.rand(2, 16, 77, generator=g)  # 4x4 layer: (uncond, cond) rows
    coarse = torch.rand(2, 4, 77, generator=g)  # 2x2 layer, upsampled to 4x4
    scores, fore = aggregate([fine, coarse], 4, aggregation="smooth_meannorm", foreground=True)
    k = gaussian_kernel().numpy()

    def layer(r):  # (2, L, 77) -> smoothed (2, 77, 4, 4), re-derived with numpy
        side = int(r.shape[1] ** 0.5)
        m = r.transpose(1, 2).reshape(2, 77, side, side)
        if side != 4:
            m = torch.nn.functional.interpolate(m, scale_factor=4 // side, mode="bilinear")
        m = m.numpy()
        out = np.zeros_like(m)
        for b in range(2):
            for c in range(77):
                a = np.pad(m[b, c], 1, mode="reflect")
                for i in range(4):
                    for j in range(4):
                        out[b, c, i, j] = (a[i:i + 3, j:j + 3] * k).sum()
        return out

    tok, pair = 0, 0
    for r in (fine, coarse):
        sm = layer(r)
        tok = tok + sm[1] / (sm[1].mean(axis=(1, 2), keepdims=True) + 1e-8)
        p = np.stack([sm[0, 0], sm[0, 1:].sum(0)])
        pair = pair + p / p.mean(axis=(1, 2), keepdims=True)
    torch.testing.assert_close(scores, torch.from_numpy(tok / 2).float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(fore, torch.from_numpy(pair[0] / 2 < pair[1] / 2))
    assert fore.any() and not fore.all()


def test_ties_are_kept_and_the_later_concept_wins():
    from magicface_core.segmentation import regions_from_scores, token_tables

    scores = torch.zeros(5, 1, 4)
    scores[0, 0, 0] = 2.0  # <start> alone on top: background
    scores[2, 0, 1] = 2.0  # concept 1 alone
    scores[2, 0, 2] = scores[4, 0, 2] = 2.0  # concepts 1 and 2 tie: 2 (later) wins
    scores[1, 0, 3] = scores[2, 0, 3] = 2.0  # a non-concept token ties with concept 1
    tables = token_tables(5, [[2], [4]], None, 1.0)
    hits, labels = regions_from_scores(scores, *tables)
    assert labels.tolist() == [[0, 1, 2, 1]]
    assert hits[:, 0, 3].tolist() == [False, True, True, False, False]
    fg = torch.tensor([[True, True, False, True]])
    hits, labels = regions_from_scores(scores, *tables, foreground=fg)
    assert labels.tolist() == [[0, 1, 0, 1]] and not hits[:, 0, 2].any()


def test_the_start_token_takes_the_background_when_all_tokens_compete():
    # A prompt that is only the concept word: "prompt" tokens leave the word alone in
    # the argmax (everything becomes the concept); with all 77 competing, <start> and
    # padding keep the background.
    cross, selfm = planted()
    cross = cross.clone()
    cross[:, 1] = 0  # no "a"
    cross = cross / cross.sum(-1, keepdim=True)
    only_word = latent_semantic_map([cross], [selfm], [[2], [4, 5]], size=8,
                                    candidate_tokens=[2, 4, 5])
    assert (only_word > 0).all()
    every = latent_semantic_map([cross], [selfm], [[2], [4, 5]], size=8)
    assert (every == 0).any() and (every > 0).any()
