"""The additive key bias of RSA and RBA, and the masks and groups it is made from.

The reference bias is *added* after the 1/sqrt(d) scaling, as the authors' code does:
`w_i` on in-mask reference keys, `-inf` elsewhere, 0 on the target's own keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["reference_bias", "rsa_bias", "rba_table", "rba_bias", "masks_for_grid",
           "groups_for_grid"]


def reference_bias(
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """Per-concept key bias B_i: `w_i` where the key lies in M_i, `-inf` elsewhere."""
    if len(ref_masks) != len(weights):
        raise ValueError(f"got {len(ref_masks)} masks for {len(weights)} weights")
    out = []
    for m, w in zip(ref_masks, weights, strict=True):
        m = m.to(device=device, dtype=torch.bool).reshape(-1)
        b = torch.full(m.shape, float("-inf"), dtype=dtype, device=device)
        out.append(b.masked_fill(m, float(w)))
    return out


def rsa_bias(own_tokens: int, ref_masks: Sequence[torch.Tensor], weights: Sequence[float], *,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(L + sum L_i,) bias for RSA: 0 on the target's own keys, B_i on concept i's."""
    own = torch.zeros(own_tokens, dtype=dtype, device=device)
    return torch.cat([own, *reference_bias(ref_masks, weights, dtype=dtype, device=device)])


def rba_table(
    own_tokens: int,
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    dtype: torch.dtype,
    device: torch.device,
    rsa_row: bool = False,
) -> torch.Tensor:
    """(N+1, L + sum L_i): row g is the key bias of a query in group g. Row 0 sees
    only the target's own keys; row i also concept i's keys, biased by B_i.
    `rsa_row` appends row N+1, RSA's bias (every concept visible), so one gather
    serves RSA and RBA steps alike."""
    biases = reference_bias(ref_masks, weights, dtype=dtype, device=device)
    lengths = [b.numel() for b in biases]
    total = own_tokens + sum(lengths)
    rows = len(biases) + (2 if rsa_row else 1)
    table = torch.full((rows, total), float("-inf"), dtype=dtype, device=device)
    table[:, :own_tokens] = 0
    start = own_tokens
    for i, b in enumerate(biases):
        table[i + 1, start : start + b.numel()] = b
        if rsa_row:
            table[-1, start : start + b.numel()] = b
        start += b.numel()
    return table


def rba_bias(
    own_tokens: int,
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    groups: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """(Lq, L + sum L_i) bias for RBA: a query of group i sees its own image's keys
    and concept i's keys (biased by B_i); every other concept's keys are -inf.

    A gather from the (N+1, Lk) table, so RBA is one SDPA call with static shapes
    instead of a Python loop over groups.
    """
    table = rba_table(own_tokens, ref_masks, weights, dtype=dtype, device=device)
    return table[groups.to(device=device, dtype=torch.long)]


def _resize_nearest(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    return F.interpolate(x[None, None].float(), size=grid, mode="nearest")[0, 0]


def masks_for_grid(masks: Sequence[torch.Tensor], grid: tuple[int, int],
                   device: torch.device | str) -> list[torch.Tensor]:
    """Pixel masks nearest-resized to a layer grid, flattened to (h*w,) bool."""
    return [(_resize_nearest(m, grid) > 0.5).reshape(-1).to(device) for m in masks]


def groups_for_grid(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A label map nearest-resized to a layer grid, flattened to (h*w,) long; label
    maps (B, h, w) give (B, h*w)."""
    if labels.dim() == 3:
        if tuple(labels.shape[-2:]) != tuple(grid):
            labels = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0]
        return labels.reshape(labels.shape[0], -1).long()
    return _resize_nearest(labels, grid).reshape(-1).long()
