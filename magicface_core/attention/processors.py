"""diffusers attention processors that put RSA/RBA into a UNet, one class per variant
(as diffusers has AttnProcessor2_0, FusedAttnProcessor2_0, ...), and the context
manager that installs them for the length of a call.

- `RecordingAttnProcessor`: plain attention (diffusers' AttnProcessor2_0) that records
  the maps the semantic map reads. Every layer that is not a reference layer.
- The reference layers (modified self-attention) run plain attention on every row
  but the cond target row, which attends to the references' K/V too:
  `MaskedReferenceProcessor` (the reference loop: RSA or RBA from masks and the
  label map), `DenseBiasProcessor` and `FoldedBiasProcessor` (the fast loop: a bias
  made outside the UNet, dense or folded into extra head dims).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import MagicFaceInputError
from ..unet_layout import grid_for_tokens, is_reference_layer
from .folded import attend_folded
from .ops import attend, rba, rsa
from .state import BiasSteering, MapRecorder, MaskSteering, ReferenceKV

__all__ = ["RecordingAttnProcessor", "ReferenceAttnProcessor", "MaskedReferenceProcessor",
           "DenseBiasProcessor", "FoldedBiasProcessor", "installed_processors"]


def project(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v in (B, heads, L, d) as diffusers' AttnProcessor2_0 computes them."""
    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise NotImplementedError("spatial/group-normed attention is not used by SD UNets")
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    fused = getattr(attn, "fused_projections", False)
    if fused and encoder_hidden_states is None and hasattr(attn, "to_qkv"):
        # One matmul for Q, K and V (diffusers' fuse_qkv_projections).
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    elif fused and encoder_hidden_states is not None and hasattr(attn, "to_kv"):
        query = attn.to_q(hidden_states)
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
    b = hidden_states.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def finish(attn, out: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, length, d = out.shape
    out = out.transpose(1, 2).reshape(b, length, h * d).to(dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _check_call(hidden_states: torch.Tensor, attention_mask) -> None:
    if attention_mask is not None or hidden_states.ndim != 3:
        raise NotImplementedError("attention masks and 4-D inputs are not used by SD UNets")


def _block_of(name: str) -> str:
    # "...transformer_blocks.0.attn1" -> "...transformer_blocks.0"
    return name.rsplit(".", 1)[0]


class RecordingAttnProcessor:
    """Plain SDPA attention that also records the map rows' head-averaged attention
    map where the semantic map needs it (levels no finer than the map grid)."""

    def __init__(self, name: str, recorder: MapRecorder):
        self.name, self.block = name, _block_of(name)
        self.is_cross = name.endswith("attn2")
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        _check_call(hidden_states, attention_mask)
        q, k, v = project(attn, hidden_states, encoder_hidden_states)
        out = F.scaled_dot_product_attention(q, k, v)
        rec = self.recorder
        if rec.wants(q.shape[-2]):
            record = rec.record_cross if self.is_cross else rec.record_self
            record(self.block, q, k, attn.scale)
        return finish(attn, out, hidden_states, q.dtype)


class ReferenceAttnProcessor:
    """A modified self-attention layer: each job's cond target row attends to its
    references' K/V at this layer (`attend_cond`, one per variant, all jobs in one
    call); every other row (uncond, the references themselves) runs plain
    self-attention, so the reference path is the unmodified UNet."""

    def __init__(self, name: str, recorder: MapRecorder, refs: ReferenceKV):
        self.name, self.block = name, _block_of(name)
        self.recorder, self.refs = recorder, refs

    def attend_cond(self, qc, kc, vc, ref_k, ref_v, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        _check_call(hidden_states, attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name} is not a self-attention layer")
        q, k, v = project(attn, hidden_states, None)
        tokens = q.shape[-2]
        ref_k, ref_v = self.refs.gather(self.name, k, v)
        if self.recorder.wants(tokens):
            self.recorder.record_self(self.block, q, k, attn.scale)
        if not ref_k:
            return finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states,
                          q.dtype)
        lay = self.refs.layout
        grid = grid_for_tokens(tokens, self.recorder.latent_hw)
        cond = self.attend_cond(lay.cond(q), lay.cond(k), lay.cond(v), ref_k, ref_v, grid)
        others = lay.others(q)
        if not others:  # no CFG, nothing riding: the cond rows are the whole batch
            return finish(attn, cond, hidden_states, q.dtype)
        plain = F.scaled_dot_product_attention(
            *(torch.cat(parts) if len(parts) > 1 else parts[0]
              for parts in (others, lay.others(k), lay.others(v))))
        out = torch.empty_like(q)
        lay.cond(out).copy_(cond)
        done = 0
        for part, dest in zip(others, lay.others(out), strict=True):
            dest.copy_(plain[done : done + part.shape[0]])
            done += part.shape[0]
        return finish(attn, out, hidden_states, q.dtype)


class MaskedReferenceProcessor(ReferenceAttnProcessor):
    """The reference loop's variant: RSA (Eq. 2), or RBA (Eq. 6) once the steering says
    so and a label map exists, built from the masks inside the processor."""

    def __init__(self, name: str, recorder: MapRecorder, refs: ReferenceKV,
                 steering: MaskSteering):
        super().__init__(name, recorder, refs)
        self.steering = steering

    def attend_cond(self, qc, kc, vc, ref_k, ref_v, grid):
        st = self.steering
        masks = st.masks_at(grid, qc.device)
        groups = st.groups_at(grid)
        if groups is None:  # RSA, or the first RBA step before any map exists
            return rsa(qc, kc, vc, ref_k, ref_v, masks, st.weights)
        return rba(qc, kc, vc, ref_k, ref_v, masks, st.weights, groups.to(qc.device))


class DenseBiasProcessor(ReferenceAttnProcessor):
    """The fast loop's variant with a dense per-query bias (RSA or RBA alike) made
    outside the UNet each step."""

    def __init__(self, name: str, recorder: MapRecorder, refs: ReferenceKV,
                 steering: BiasSteering):
        super().__init__(name, recorder, refs)
        self.steering = steering

    def attend_cond(self, qc, kc, vc, ref_k, ref_v, grid):
        return attend(qc, kc, vc, ref_k, ref_v, self.steering.dense[grid])


class FoldedBiasProcessor(DenseBiasProcessor):
    """The fast loop's variant with the bias folded into extra head dims (mask-free
    SDPA); a layer whose (grid, head dim) has no folded columns uses the dense bias."""

    def attend_cond(self, qc, kc, vc, ref_k, ref_v, grid):
        folded = self.steering.folded.get((grid, qc.shape[-1]))
        if folded is None:
            return super().attend_cond(qc, kc, vc, ref_k, ref_v, grid)
        return attend_folded(qc, kc, vc, ref_k, ref_v, *folded)


@contextmanager
def installed_processors(unet, reference_layers: Sequence[str],
                         reference: Callable[[str], object],
                         other: Callable[[str], object]) -> Iterator[dict]:
    """Install `reference(name)` on the reference layers and `other(name)` everywhere
    else for the block; the UNet's own processors come back afterwards, whatever
    happens inside (an aborted call leaves the UNet as it was)."""
    original = unet.attn_processors
    procs, modified = {}, 0
    for key in original:
        name = key.removesuffix(".processor")
        if is_reference_layer(name, reference_layers):
            procs[key] = reference(name)
            modified += 1
        else:
            procs[key] = other(name)
    if modified == 0:
        raise MagicFaceInputError(f"reference_layers {list(reference_layers)} match no "
                                  "self-attention layer of this UNet")
    unet.set_attn_processor(procs)
    try:
        yield procs
    finally:
        unet.set_attn_processor(original)
