"""The latent semantic map (Eqs. 3-5): which concept each latent position belongs to."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["latent_semantic_map", "token_scores", "refine_by_self_attention", "combine_layers",
           "token_tables", "labels_from_scores"]


def _square(tokens: int) -> tuple[int, int]:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"a map of {tokens} positions is not a square grid; pass grids=")
    return side, side


def token_scores(
    cross_maps: Sequence[torch.Tensor],
    self_maps: Sequence[torch.Tensor],
    size: int | tuple[int, int] = 32,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """(T, h, w) per-token scores: C^_l = S_l C_l (Eq. 3), each resized bilinearly to
    one grid and averaged over layers (Eq. 4), then each token channel renormalised
    to sum to 1 over space (Eq. 5)."""
    if len(cross_maps) != len(self_maps):
        raise ValueError(f"{len(cross_maps)} cross-attention maps but {len(self_maps)} self maps")
    refined = []
    for i, (c, s) in enumerate(zip(cross_maps, self_maps, strict=True)):
        if s.shape != (c.shape[0], c.shape[0]):
            raise ValueError(f"layer {i}: self map {tuple(s.shape)} does not match "
                             f"cross map {tuple(c.shape)}")
        refined.append(s.float() @ c.float())  # (L, T)
    return combine_layers(refined, size, grids=grids)


def refine_by_self_attention(cross_map: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Eq. 3's S C, with S = softmax(s Q K^T) averaged over heads, without forming S.

    S C = mean_h softmax(s Q_h K_h^T) C: one SDPA call whose values are the cross map,
    so the (L x L) self-attention map is never materialised. `q`, `k` are one batch
    row (1, heads, L, d); runs in fp32 like the explicit product.
    """
    length, tokens = cross_map.shape
    if q.shape[-2] != length or k.shape[-2] != length:
        raise ValueError(f"self-attention of {q.shape[-2]} tokens does not match a cross "
                         f"map of {length} positions")
    pad = -tokens % 8  # fused kernels want the value width a multiple of 8
    # Materialised per head (small): fused kernels may refuse a zero head stride.
    values = F.pad(cross_map.float(), (0, pad))[None, None].expand(1, q.shape[1], -1, -1)
    values = values.contiguous()
    out = F.scaled_dot_product_attention(q.float(), k.float(), values, scale=scale)
    return out[0, :, :, :tokens].mean(dim=0)


def combine_layers(
    refined: Sequence[torch.Tensor],
    size: int | tuple[int, int] = 32,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Eqs. 4-5 on refined maps C^_l (L_l, T): resize to one grid, average over layers,
    renormalise each token channel over space. Returns (T, h, w)."""
    if not refined:
        raise ValueError("no attention maps were given")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    acc = None
    for i, r in enumerate(refined):
        grid = grids[i] if grids is not None else _square(r.shape[0])
        r = r.float().T.reshape(1, r.shape[1], *grid)
        r = F.interpolate(r, size=hw, mode="bilinear", align_corners=False)[0]
        acc = r if acc is None else acc + r
    acc = acc / len(refined)
    return acc / acc.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def latent_semantic_map(
    cross_maps: Sequence[torch.Tensor],
    self_maps: Sequence[torch.Tensor],
    concept_tokens: Sequence[Sequence[int]],
    size: int | tuple[int, int] = 32,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
    candidate_tokens: Sequence[int] | None = None,
    ca_scale: float = 1.0,
) -> torch.Tensor:
    """Label map (h, w): i where the argmax token is one of concept i's tokens, else 0.

    `candidate_tokens` are the token positions competing in the argmax (default all);
    the pipeline passes the prompt's own tokens, leaving out <start> and padding.
    `ca_scale` < 1 down-weights non-concept candidates first (an extra of the
    authors' code; 1 leaves them alone).
    """
    scores = token_scores(cross_maps, self_maps, size, grids=grids)
    tables = token_tables(scores.shape[0], concept_tokens, candidate_tokens, ca_scale,
                          device=scores.device)
    return labels_from_scores(scores, *tables)


def token_tables(
    n_tokens: int,
    concept_tokens: Sequence[Sequence[int]],
    candidate_tokens: Sequence[int] | None = None,
    ca_scale: float = 1.0,
    *,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bias, scale, label_of), each (T,): what the argmax of Eq. 5 needs, as static-shape
    tensors. Non-candidates get bias -inf; non-concept candidates scale `ca_scale`;
    `label_of[t]` is the concept (1..N) owning token t, or 0."""
    candidates = set(range(n_tokens) if candidate_tokens is None else candidate_tokens)
    label_of = torch.zeros(n_tokens, dtype=torch.long)
    for i, toks in enumerate(concept_tokens):
        if not toks:
            raise ValueError(f"concept {i + 1} has no tokens")
        for t in toks:
            if not 0 <= t < n_tokens:
                raise ValueError(f"token index {t} out of range for {n_tokens} tokens")
            label_of[t] = i + 1
            candidates.add(t)  # concept tokens always compete
    bias = torch.full((n_tokens,), float("-inf"))
    bias[sorted(c for c in candidates if 0 <= c < n_tokens)] = 0.0
    scale = torch.where(label_of > 0, 1.0, float(ca_scale))
    return bias.to(device), scale.to(device), label_of.to(device)


def labels_from_scores(scores: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                       label_of: torch.Tensor) -> torch.Tensor:
    """Argmax over tokens of (T, h, w) scores, mapped to concept labels."""
    weighted = scores * scale[:, None, None].to(scores.dtype) + bias[:, None, None].to(
        scores.dtype)
    return label_of[weighted.argmax(dim=0)]
