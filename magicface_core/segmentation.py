"""The latent semantic map (Eqs. 3-5): which concept each latent position belongs to."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["latent_semantic_map", "token_scores", "token_tables", "labels_from_scores"]


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
    if not cross_maps:
        raise ValueError("no attention maps were given")
    if len(cross_maps) != len(self_maps):
        raise ValueError(f"{len(cross_maps)} cross-attention maps but {len(self_maps)} self maps")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    acc = None
    for i, (c, s) in enumerate(zip(cross_maps, self_maps, strict=True)):
        if s.shape != (c.shape[0], c.shape[0]):
            raise ValueError(f"layer {i}: self map {tuple(s.shape)} does not match "
                             f"cross map {tuple(c.shape)}")
        grid = grids[i] if grids is not None else _square(c.shape[0])
        refined = s.float() @ c.float()  # (L, T)
        refined = refined.T.reshape(1, c.shape[1], *grid)
        refined = F.interpolate(refined, size=hw, mode="bilinear", align_corners=False)[0]
        acc = refined if acc is None else acc + refined
    acc = acc / len(cross_maps)
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
