"""Helpers for tests of the pipeline: the bias form for a block, latent comparison,
and a tiny random segment-anything model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch

from magicface_core import MagicFacePipeline


def assert_latents_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """The same computation up to float order: a relative error of the whole tensor
    (element-wise tolerances trip on near-zero entries when rows are batched apart)."""
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < rel, f"relative error {err:.2e} >= {rel:.0e}"


@contextmanager
def bias_form(pipe: MagicFacePipeline, fold: bool, min_tokens: int = 0) -> Iterator[None]:
    """The fast loop's RSA/RBA bias form for a block; the shared pipeline's setting is
    restored after it."""
    before = pipe.fold_attention_bias, pipe.fold_min_tokens
    pipe.fold_attention_bias, pipe.fold_min_tokens = fold, min_tokens
    try:
        yield
    finally:
        pipe.fold_attention_bias, pipe.fold_min_tokens = before


def tiny_sam():
    """A random-weight Sam built from segment-anything's own classes, tiny encoder."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    img, patch, dim = 64, 16, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img, patch_size=patch, in_chans=3, embed_dim=32, depth=1, num_heads=2,
            mlp_ratio=2.0, out_chans=dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), act_layer=torch.nn.GELU,
            use_abs_pos=True, use_rel_pos=False, window_size=0, global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(img // patch, img // patch),
            input_image_size=(img, img), mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2),
            transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
        ),
    )
    return sam.eval()
