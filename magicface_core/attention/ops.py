"""RSA and RBA (Eqs. 2 and 6) as SDPA calls with an additive key bias.

Tensors are laid out as SDPA wants them: (batch, heads, tokens, head_dim).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .bias import rba_bias, rsa_bias

__all__ = ["attend", "rsa", "rba", "joined"]


def check_refs(k: torch.Tensor, ref_k, ref_v, ref_masks, weights) -> None:
    n = len(ref_k)
    if not (len(ref_v) == len(ref_masks) == len(weights) == n):
        raise ValueError("ref_k, ref_v, ref_masks and weights must have the same length")
    for i in range(n):
        if ref_k[i].shape[-2] != ref_masks[i].numel():
            raise ValueError(
                f"reference {i}: {ref_k[i].shape[-2]} keys but a mask of {ref_masks[i].numel()}"
            )
        if ref_k[i].shape != ref_v[i].shape:
            raise ValueError(f"reference {i}: key and value shapes differ")
        if ref_k[i].shape[-1] != k.shape[-1]:
            raise ValueError(f"reference {i}: head dim {ref_k[i].shape[-1]} != {k.shape[-1]}")


def joined(k: torch.Tensor, v: torch.Tensor, ref_k: Sequence[torch.Tensor],
           ref_v: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[K ; K_1..K_N] and [V ; V_1..V_N], the references broadcast over the batch."""
    b = k.shape[0]
    keys = torch.cat([k, *(rk.expand(b, -1, -1, -1) for rk in ref_k)], dim=-2)
    values = torch.cat([v, *(rv.expand(b, -1, -1, -1) for rv in ref_v)], dim=-2)
    return keys, values


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_k: Sequence[torch.Tensor],
    ref_v: Sequence[torch.Tensor],
    bias: torch.Tensor,
) -> torch.Tensor:
    """One SDPA over [K ; K_1..K_N] with an additive bias of shape (Lk,), (Lq, Lk), or
    (B, Lq, Lk) (one per batch row: jobs sampled together)."""
    keys, values = joined(k, v, ref_k, ref_v)
    if bias.dim() == 1:
        bias = bias.expand(q.shape[-2], -1)
    elif bias.dim() == 3:
        bias = bias[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)


def rsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_k: Sequence[torch.Tensor],
    ref_v: Sequence[torch.Tensor],
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """Reference-guided self-attention (Eq. 2).

    softmax([sQK^T ; sQK_1^T + B_1 ; ... ; sQK_N^T + B_N]) [V ; V_1 ; ... ; V_N]
    """
    check_refs(k, ref_k, ref_v, ref_masks, weights)
    if not ref_k:
        return F.scaled_dot_product_attention(q, k, v)
    bias = rsa_bias(k.shape[-2], ref_masks, weights, dtype=q.dtype, device=q.device)
    return attend(q, k, v, ref_k, ref_v, bias)


def rba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_k: Sequence[torch.Tensor],
    ref_v: Sequence[torch.Tensor],
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    groups: torch.Tensor,
) -> torch.Tensor:
    """Region-grouped blend attention (Eq. 6).

    `groups` (Lq,) holds 0 (background: attends to its own K/V only) or i in 1..N
    (attends to [K ; K_i], [V ; V_i] with bias B_i).
    """
    check_refs(k, ref_k, ref_v, ref_masks, weights)
    if groups.shape != (q.shape[-2],):
        raise ValueError(f"groups must have shape ({q.shape[-2]},), got {tuple(groups.shape)}")
    if not ref_k:
        return F.scaled_dot_product_attention(q, k, v)
    bias = rba_bias(k.shape[-2], ref_masks, weights, groups, dtype=q.dtype, device=q.device)
    return attend(q, k, v, ref_k, ref_v, bias)
