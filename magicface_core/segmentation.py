"""The latent semantic map (Eqs. 3-5): which concept each latent position belongs to."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["latent_semantic_map", "token_scores"]


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
    n_tokens = scores.shape[0]
    candidates = list(range(n_tokens)) if candidate_tokens is None else list(candidate_tokens)
    label_of = torch.zeros(n_tokens, dtype=torch.long)
    for i, toks in enumerate(concept_tokens):
        if not toks:
            raise ValueError(f"concept {i + 1} has no tokens")
        for t in toks:
            if not 0 <= t < n_tokens:
                raise ValueError(f"token index {t} out of range for {n_tokens} tokens")
            label_of[t] = i + 1
    # Concept tokens always compete, whatever the candidate list says.
    candidates += [t for toks in concept_tokens for t in toks]
    cand = torch.tensor(sorted(set(candidates)), dtype=torch.long)
    picked = scores[cand.to(scores.device)]
    cand_labels = label_of[cand].to(scores.device)
    if ca_scale != 1.0:
        weight = torch.where(cand_labels > 0, 1.0, float(ca_scale)).to(picked.dtype)
        picked = picked * weight[:, None, None]
    return cand_labels[picked.argmax(dim=0)]
