"""The RSA/RBA bias folded into extra head dims, so SDPA runs without a mask.

Queries get `[1, hidden_1..hidden_N]`, keys `[B_i / s, MASKED / s on concept i]`, so
`s q'.k'` is `s q.k` plus exactly the bias: the SDPA call has no mask (the fused flash
kernel can run it) and no (Lq x Lk) bias is built or read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .bias import reference_bias
from .ops import joined

__all__ = ["MASKED", "MAX_FOLDED_WEIGHT", "fold_width", "folded_key_columns",
           "folded_query_table", "attend_folded"]

# A hidden key's logit offset on the folded path. Not -inf: the folded columns are
# multiplied by 0 for queries that may see the key, and 0 * -inf is NaN. -2000 makes
# exp() underflow to exactly 0 in fp32 next to any real logit, and -2000 * sqrt(d)
# stays finite in fp16 for every head dim SDPA accepts (<= 256).
MASKED = -2000.0
# Largest |w_i| the folded path accepts (w * sqrt(d) must stay well inside fp16).
MAX_FOLDED_WEIGHT = 100.0


def fold_width(head_dim: int, n_concepts: int) -> int:
    """Columns appended to each head on the folded path: one key-bias column, one
    per concept, then zeros up to a multiple of 8 (what the fused SDPA kernels need)."""
    total = head_dim + n_concepts + 1
    return -(-total // 8) * 8 - head_dim


def folded_key_columns(
    own_tokens: int,
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """(L + sum L_i, fold_width) key columns that carry RSA/RBA's bias inside Q K^T.

    With the query columns of `folded_query_table`, the extra dot product adds, after
    SDPA's 1/sqrt(d) scaling, exactly the bias of `rba_table` (with MASKED for -inf):
    column 0 holds the key's own bias (0 on the target's keys, B_i on concept i's),
    column i holds MASKED on concept i's keys and is switched on only for queries
    that must not see concept i. Values are stored divided by the scale.
    """
    n = len(ref_masks)
    if any(not 0 < abs(float(w)) <= MAX_FOLDED_WEIGHT for w in weights):
        raise ValueError(f"the folded bias needs 0 < |weight| <= {MAX_FOLDED_WEIGHT}")
    inv_scale = float(head_dim) ** 0.5
    biases = [b.clamp_min(MASKED) for b in reference_bias(ref_masks, weights,
                                                          dtype=torch.float32, device=device)]
    lengths = [b.numel() for b in biases]
    cols = torch.zeros(own_tokens + sum(lengths), fold_width(head_dim, n),
                       dtype=torch.float32, device=device)
    start = own_tokens
    for i, b in enumerate(biases):
        cols[start : start + b.numel(), 0] = b
        cols[start : start + b.numel(), i + 1] = MASKED
        start += b.numel()
    return (cols * inv_scale).to(dtype)


def folded_query_table(n_concepts: int, *, head_dim: int, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """(N+2, fold_width) query columns. Rows 0..N: RBA groups (group g sees concept g
    only, group 0 none); row N+1: RSA (every concept visible)."""
    n = n_concepts
    table = torch.zeros(n + 2, fold_width(head_dim, n), dtype=dtype, device=device)
    table[:, 0] = 1
    table[: n + 1, 1 : n + 1] = 1
    idx = torch.arange(1, n + 1, device=device)
    table[idx, idx] = 0
    return table


def attend_folded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_k: Sequence[torch.Tensor],
    ref_v: Sequence[torch.Tensor],
    q_cols: torch.Tensor,
    k_cols: torch.Tensor,
) -> torch.Tensor:
    """`attend` with the bias folded into extra head dims instead of an additive mask.

    Same result (up to the rounding of w*sqrt(d) to the dtype), but the SDPA call has
    no mask: the fused flash kernel can run it, and no (Lq x Lk) bias is materialised
    or read. `q_cols` (Lq, p) are rows of `folded_query_table`, `k_cols` (Lk, p) come
    from `folded_key_columns`; with a leading batch dim, one per batch row.
    """
    b, h, _, d = q.shape
    keys, values = joined(k, v, ref_k, ref_v)

    def per_head(cols: torch.Tensor) -> torch.Tensor:
        cols = cols.to(q.dtype)
        return (cols[:, None] if cols.dim() == 3 else cols).expand(b, h, -1, -1)

    qf = torch.cat([q, per_head(q_cols)], dim=-1)
    kf = torch.cat([keys, per_head(k_cols)], dim=-1)
    vf = F.pad(values, (0, q_cols.shape[-1]))
    out = F.scaled_dot_product_attention(qf, kf, vf, scale=d**-0.5)
    return out[..., :d]
