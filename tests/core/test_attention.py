"""RSA / RBA against a direct float64 transcription of Eqs. 2 and 6."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from magicface_core.attention import (
    BatchLayout,
    MapRecorder,
    MaskedReferenceProcessor,
    MaskSteering,
    RecordingAttnProcessor,
    ReferenceKV,
    attend_folded,
    fold_width,
    folded_key_columns,
    folded_query_table,
    rba,
    rba_table,
    rsa,
    rsa_bias,
)
from magicface_core.unet_layout import grid_for_tokens


def eq2(q, k, v, ref_k, ref_v, masks, weights):
    """Eq. 2, query row by query row, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = 1.0 / math.sqrt(q.shape[-1])
    B, H, Lq, _ = q.shape
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for j in range(Lq):
                logits = [s * (k[b, h] @ q[b, h, j])]
                vals = [v[b, h]]
                for rk, rv, m, w in zip(ref_k, ref_v, masks, weights, strict=True):
                    bias = torch.where(m, torch.tensor(float(w)), torch.tensor(-math.inf))
                    logits.append(s * (rk[0, h].double() @ q[b, h, j]) + bias.double())
                    vals.append(rv[0, h].double())
                p = torch.softmax(torch.cat(logits), dim=0)
                out[b, h, j] = p @ torch.cat(vals)
    return out


def eq6(q, k, v, ref_k, ref_v, masks, weights, groups):
    """Eq. 6: each query attends to its own keys plus (for group i > 0) concept i's."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    for j in range(q.shape[2]):
        g = int(groups[j])
        sel = [] if g == 0 else [g - 1]
        out[:, :, j : j + 1] = eq2(q[:, :, j : j + 1], k, v, [ref_k[i] for i in sel],
                                   [ref_v[i] for i in sel], [masks[i] for i in sel],
                                   [weights[i] for i in sel])
    return out


def make(seed, B=1, H=2, L=12, d=4, n=2, ref_lens=None, mask_kind="random"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, d, generator=g)
    k = torch.randn(B, H, L, d, generator=g)
    v = torch.randn(B, H, L, d, generator=g)
    ref_lens = ref_lens or [L] * n
    ref_k = [torch.randn(1, H, n_i, d, generator=g) for n_i in ref_lens]
    ref_v = [torch.randn(1, H, n_i, d, generator=g) for n_i in ref_lens]
    masks = []
    for i, n_i in enumerate(ref_lens):
        kind = mask_kind if isinstance(mask_kind, str) else mask_kind[i]
        if kind == "empty":
            masks.append(torch.zeros(n_i, dtype=torch.bool))
        elif kind == "full":
            masks.append(torch.ones(n_i, dtype=torch.bool))
        else:
            m = torch.rand(n_i, generator=g) < 0.5
            m[0] = True
            masks.append(m)
    weights = [float(x) for x in (torch.rand(n, generator=g) * 4 + 0.1)]
    return q, k, v, ref_k, ref_v, masks, weights


SHAPES = [dict(B=1, H=1, L=4, d=2), dict(B=2, H=2, L=9, d=4), dict(B=1, H=3, L=16, d=8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mask_kind", ["random", "empty", "full", ("empty", "full", "random")])
def test_rsa_matches_eq2(shape, n, mask_kind):
    if isinstance(mask_kind, tuple):
        mask_kind = mask_kind[:n]
    args = make(100 * n + shape["L"], n=n, mask_kind=mask_kind, **shape)
    ref = eq2(*args)
    got = rsa(*args)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # In float64 the SDPA form and the transcription agree to rounding.
    q, k, v, rk, rv, m, w = args
    got64 = rsa(q.double(), k.double(), v.double(), [x.double() for x in rk],
                [x.double() for x in rv], m, w)
    torch.testing.assert_close(got64, ref, atol=1e-12, rtol=1e-10)


def test_rsa_reference_lengths_may_differ():
    args = make(3, L=6, n=2, ref_lens=[5, 11])
    torch.testing.assert_close(rsa(*args).double(), eq2(*args), atol=1e-5, rtol=1e-5)


def test_rsa_with_empty_masks_is_self_attention():
    q, k, v, rk, rv, _, w = make(5, n=3)
    masks = [torch.zeros(12, dtype=torch.bool)] * 3
    torch.testing.assert_close(rsa(q, k, v, rk, rv, masks, w),
                               F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)


def test_weight_multiplies_in_mask_attention_by_exp_w():
    # One query, one own key and one reference key with equal logits: the reference
    # key's weight relative to the own key is e^w.
    q = torch.zeros(1, 1, 1, 2)
    k = torch.zeros(1, 1, 1, 2)
    v = torch.tensor([[[[1.0, 0.0]]]])
    rk = [torch.zeros(1, 1, 1, 2)]
    rv = [torch.tensor([[[[0.0, 1.0]]]])]
    out = rsa(q, k, v, rk, rv, [torch.tensor([True])], [3.0])
    ratio = out[0, 0, 0, 1] / out[0, 0, 0, 0]
    assert ratio.item() == pytest.approx(math.exp(3.0), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mask_kind", ["random", "empty", "full"])
def test_rba_matches_eq6(shape, n, mask_kind):
    args = make(7 * n + shape["H"], n=n, mask_kind=mask_kind, **shape)
    g = torch.Generator().manual_seed(n)
    groups = torch.randint(0, n + 1, (shape["L"],), generator=g)
    groups[0], groups[-1] = 0, n  # both ends of the range always occur
    ref = eq6(*args, groups)
    torch.testing.assert_close(rba(*args, groups).double(), ref, atol=1e-5, rtol=1e-5)


def test_rba_all_background_is_self_attention_and_all_i_is_rsa_with_i():
    q, k, v, rk, rv, m, w = make(11, n=2)
    zeros = torch.zeros(12, dtype=torch.long)
    torch.testing.assert_close(rba(q, k, v, rk, rv, m, w, zeros),
                               F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)
    twos = torch.full((12,), 2, dtype=torch.long)
    torch.testing.assert_close(rba(q, k, v, rk, rv, m, w, twos),
                               rsa(q, k, v, rk[1:], rv[1:], m[1:], w[1:]), atol=1e-6, rtol=1e-6)


def folded(q, k, v, ref_k, ref_v, masks, weights, groups, dtype=torch.float32):
    """RBA (groups 0..N) or RSA (group N+1) through the folded path."""
    d = q.shape[-1]
    table = folded_query_table(len(ref_k), head_dim=d, dtype=dtype, device=q.device)
    cols = folded_key_columns(k.shape[-2], masks, weights, head_dim=d, dtype=dtype,
                              device=q.device)
    return attend_folded(q.to(dtype), k.to(dtype), v.to(dtype), [x.to(dtype) for x in ref_k],
                         [x.to(dtype) for x in ref_v], table[groups], cols)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mask_kind", ["random", "empty", "full"])
def test_folded_bias_matches_eq2_and_eq6(shape, n, mask_kind):
    args = make(13 * n + shape["L"], n=n, mask_kind=mask_kind, **shape)
    g = torch.Generator().manual_seed(n + 40)
    groups = torch.randint(0, n + 1, (shape["L"],), generator=g)
    groups[0], groups[-1] = 0, n
    torch.testing.assert_close(folded(*args, groups).double(), eq6(*args, groups),
                               atol=1e-5, rtol=1e-5)
    rsa_rows = torch.full((shape["L"],), n + 1, dtype=torch.long)
    torch.testing.assert_close(folded(*args, rsa_rows).double(), eq2(*args),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [40, 80, 160])
def test_folded_bias_in_fp16_stays_finite_and_close(d):
    # SD1.5's head dims: MASKED * sqrt(d) must not overflow fp16 (0 * inf would be NaN).
    q, k, v, rk, rv, m, w = make(17, H=2, L=64, d=d, n=3)
    q, k = q * 3, k * 3  # logits of a realistic size
    groups = torch.arange(64) % 5
    got = folded(q, k, v, rk, rv, m, [20.0, 3.0, 0.5], groups.clamp_max(4),
                 dtype=torch.float16)
    assert torch.isfinite(got).all()
    want = eq6(q, k, v, rk, rv, m, [20.0, 3.0, 0.5], groups.clamp_max(3))
    rsa_rows = groups == 4
    want[:, :, rsa_rows] = eq2(q[:, :, rsa_rows], k, v, rk, rv, m, [20.0, 3.0, 0.5])
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_rsa_row_of_the_bias_table_is_rsas_bias():
    _, _, _, _, _, m, w = make(19, L=10, n=3)
    kw = dict(dtype=torch.float32, device=torch.device("cpu"))
    table = rba_table(10, m, w, rsa_row=True, **kw)
    assert table.shape == (5, 40)
    torch.testing.assert_close(table[:4], rba_table(10, m, w, **kw))
    torch.testing.assert_close(table[4], rsa_bias(10, m, w, **kw))


def test_fold_width_pads_to_a_multiple_of_eight():
    for d in (2, 4, 40, 64, 80, 160):
        for n in (1, 2, 3, 7):
            p = fold_width(d, n)
            assert p >= n + 1 and (d + p) % 8 == 0 and p < n + 9


def test_folded_bias_refuses_weights_it_cannot_carry():
    with pytest.raises(ValueError, match="folded bias"):
        folded_key_columns(4, [torch.ones(4, dtype=torch.bool)], [1000.0], head_dim=8,
                           dtype=torch.float16, device=torch.device("cpu"))


def test_bad_shapes_are_rejected():
    q, k, v, rk, rv, m, w = make(1, n=2)
    with pytest.raises(ValueError, match="same length"):
        rsa(q, k, v, rk, rv, m[:1], w)
    with pytest.raises(ValueError, match="mask"):
        rsa(q, k, v, rk, rv, [m[0][:3], m[1]], w)
    with pytest.raises(ValueError, match="groups"):
        rba(q, k, v, rk, rv, m, w, torch.zeros(5, dtype=torch.long))


def test_grid_for_tokens_follows_unet_ceil_halving():
    assert grid_for_tokens(64 * 64, (64, 64)) == (64, 64)
    assert grid_for_tokens(32 * 32, (64, 64)) == (32, 32)
    assert grid_for_tokens(33 * 25, (65, 49)) == (33, 25)
    with pytest.raises(ValueError):
        grid_for_tokens(7, (64, 64))


def _attention_module(dim=8, heads=2):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads)
    attn.set_processor(AttnProcessor2_0())
    return attn.eval()


def test_processor_rows_follow_the_method():
    """Uncond and reference rows get plain self-attention; the cond row gets RSA
    against the riding references' K/V, and RBA once a label map is set."""
    attn = _attention_module()
    latent_hw = (4, 4)
    x = torch.randn(4, 16, 8)  # uncond, cond, two references
    masks = [torch.rand(32, 32) > 0.5, torch.zeros(32, 32, dtype=torch.bool)]
    masks[1][:16] = True
    layout = BatchLayout.build(do_cfg=True, n_concepts=2, riding=[0, 1])
    steering = MaskSteering(weights=[2.0, 3.0], masks=masks)
    proc = MaskedReferenceProcessor("up_blocks.3.attentions.0.transformer_blocks.0.attn1",
                                    MapRecorder(latent_hw, (2, 2), layout), ReferenceKV(layout),
                                    steering)
    with torch.no_grad():
        plain = attn(x)
        attn.set_processor(proc)
        got = attn(x)
        for row in (0, 2, 3):
            torch.testing.assert_close(got[row], plain[row], atol=1e-6, rtol=1e-6)
        h, d = attn.heads, 8 // attn.heads

        def split(t):
            return t.view(4, 16, h, d).transpose(1, 2)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
        grid_masks = [F.interpolate(m[None, None].float(), size=(4, 4))[0, 0].bool().reshape(-1)
                      for m in masks]
        want = rsa(q[1:2], k[1:2], v[1:2], [k[2:3], k[3:4]], [v[2:3], v[3:4]], grid_masks,
                   [2.0, 3.0])
        want = attn.to_out[0](want.transpose(1, 2).reshape(1, 16, 8))
        torch.testing.assert_close(got[1:2], want, atol=1e-6, rtol=1e-6)

        steering.rba = True
        labels = torch.tensor([[1, 0], [2, 2]])
        steering.set_labels(labels)
        got = attn(x)
        groups = F.interpolate(labels[None, None].float(), size=(4, 4))[0, 0].long().reshape(-1)
        want = rba(q[1:2], k[1:2], v[1:2], [k[2:3], k[3:4]], [v[2:3], v[3:4]], grid_masks,
                   [2.0, 3.0], groups)
        want = attn.to_out[0](want.transpose(1, 2).reshape(1, 16, 8))
        torch.testing.assert_close(got[1:2], want, atol=1e-6, rtol=1e-6)


def test_recording_processor_is_plain_attention_and_records_cond_maps():
    attn = _attention_module()
    x = torch.randn(3, 4, 8)
    ctx = torch.randn(3, 5, 8)
    layout = BatchLayout.build(do_cfg=True, n_concepts=1, riding=[])
    state = MapRecorder((4, 4), (2, 2), layout, enabled=True)
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=ctx)
        attn.set_processor(RecordingAttnProcessor("mid_block.attentions.0.transformer_blocks.0"
                                                  ".attn2", state))
        got = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=1e-6)
    recorded = state.cross["mid_block.attentions.0.transformer_blocks.0"]
    assert recorded.shape == (1, 4, 5)  # the cond row only
    torch.testing.assert_close(recorded.sum(-1), torch.ones(1, 4))
    # With the foreground the uncond row (0) is kept too, in order.
    state.layout = BatchLayout.build(do_cfg=True, n_concepts=1, riding=[], foreground=True)
    with torch.no_grad():
        attn(x, encoder_hidden_states=ctx)
    both = state.cross["mid_block.attentions.0.transformer_blocks.0"]
    assert both.shape == (2, 4, 5)
    torch.testing.assert_close(both[1:], recorded)
    assert not torch.allclose(both[0], both[1])
