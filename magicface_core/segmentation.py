"""The latent semantic map (Eqs. 3-5): which concept each latent position belongs to.

Two variants of every step, picked by GenerationConfig (see its presets):

- refinement: "s" is Eq. 3, C^ = S C; "s+3s2" is the authors' ((S + 3 S^2) / 4) C.
- aggregation: "mean" is Eqs. 4-5 (resize every layer to one grid, average, renormalise
  each token over space); "smooth_meannorm" is the authors' (resize, 3x3 Gaussian
  with reflect padding, divide each layer's token channel by its spatial mean, average).

A map is a set of per-token regions: a token owns a position where its score is the
maximum (ties kept). Concept i's region is the union of its tokens' regions; where
two concepts' regions overlap the later concept wins (the authors' RBA applies the
concepts in order, each overwriting the last).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["latent_semantic_map", "token_scores", "refine", "refine_by_self_attention",
           "combine_layers", "aggregate", "token_tables", "labels_from_scores",
           "regions_from_scores", "semantic_regions", "gaussian_kernel", "smooth",
           "REFINEMENTS", "AGGREGATIONS"]

REFINEMENTS = ("s", "s+3s2")
AGGREGATIONS = ("mean", "smooth_meannorm")


def _square(tokens: int) -> tuple[int, int]:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"a map of {tokens} positions is not a square grid; pass grids=")
    return side, side


def gaussian_kernel(size: int = 3, sigma: float = 0.5,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """(size, size) smoothing kernel summing to 1, as the authors' smoothing builds it:
    each axis weighs offset x by exp(-(x / (2 sigma))^2) (a Gaussian of standard
    deviation sigma * sqrt(2), not sigma). Made on `device` (no host copy: the fast
    loop builds it inside a CUDA graph)."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    one = torch.exp(-((x / (2 * sigma)) ** 2))
    k = one[:, None] * one[None, :]
    return k / k.sum()


def smooth(x: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Each (h, w) plane of `x` (..., h, w) reflect-padded and convolved with
    `gaussian_kernel` (float32)."""
    lead = x.shape[:-2]
    planes = x.float().reshape(-1, 1, *x.shape[-2:])
    pad = size // 2
    planes = F.pad(planes, (pad, pad, pad, pad), mode="reflect")
    kernel = gaussian_kernel(size, sigma, planes.device)[None, None]
    return F.conv2d(planes, kernel).reshape(*lead, *x.shape[-2:])


def refine(cross_map: torch.Tensor, self_map: torch.Tensor, refinement: str = "s") -> torch.Tensor:
    """Eq. 3 with the self-attention map S formed explicitly: `cross_map` (..., L, T),
    `self_map` (..., L, L). "s": S C; "s+3s2": ((S + 3 S S) / 4) C. fp32."""
    s, c = self_map.float(), cross_map.float()
    if s.shape[-1] != c.shape[-2] or s.shape[-2] != c.shape[-2]:
        raise ValueError(f"self map {tuple(s.shape)} does not match cross map {tuple(c.shape)}")
    if refinement == "s":
        return s @ c
    if refinement == "s+3s2":
        return ((s + 3 * (s @ s)) / 4) @ c
    raise ValueError(f"refinement must be one of {REFINEMENTS}, got {refinement!r}")


def refine_by_self_attention(cross_map: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             scale: float, refinement: str = "s") -> torch.Tensor:
    """`refine` without forming S: S V = mean_h softmax(s Q_h K_h^T) V is one SDPA call
    whose values are V, so the (L x L) map is never materialised. "s+3s2" is
    (S C + 3 S (S C)) / 4, two calls.

    `q`, `k` are (R, heads, L, d) for R batch rows; `cross_map` is (R, L, T) or, for
    one row, (L, T) (the result has the same rank). Runs in fp32 like `refine`.
    """
    one_row = cross_map.dim() == 2
    c = cross_map[None] if one_row else cross_map
    length = c.shape[-2]
    if q.shape[-2] != length or k.shape[-2] != length or q.shape[0] != c.shape[0]:
        raise ValueError(f"self-attention of {q.shape[0]} x {q.shape[-2]} tokens does not "
                         f"match a cross map of {c.shape[0]} x {length} positions")
    qf, kf = q.float(), k.float()

    def apply_s(values: torch.Tensor) -> torch.Tensor:
        tokens = values.shape[-1]
        pad = -tokens % 8  # fused kernels want the value width a multiple of 8
        # Materialised per head (small): fused kernels may refuse a zero head stride.
        v = F.pad(values, (0, pad))[:, None].expand(-1, q.shape[1], -1, -1).contiguous()
        out = F.scaled_dot_product_attention(qf, kf, v, scale=scale)
        return out[..., :tokens].mean(dim=1)

    sc = apply_s(c.float())
    if refinement == "s":
        out = sc
    elif refinement == "s+3s2":
        out = (sc + 3 * apply_s(sc)) / 4
    else:
        raise ValueError(f"refinement must be one of {REFINEMENTS}, got {refinement!r}")
    return out[0] if one_row else out


def _resized(r: torch.Tensor, grid: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """(R, L, T) refined maps -> (R, T, h, w) on the map grid (bilinear)."""
    m = r.float().transpose(-1, -2).reshape(r.shape[0], r.shape[-1], *grid)
    if tuple(grid) == tuple(hw):
        return m
    return F.interpolate(m, size=hw, mode="bilinear", align_corners=False)


def aggregate(
    refined: Sequence[torch.Tensor],
    size: int | tuple[int, int] = 32,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
    aggregation: str = "mean",
    foreground: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eqs. 4-5 over layers. Each refined map is (R, L, T): row -1 is the cond branch
    whose tokens are scored; with `foreground`, row 0 is the uncond branch whose
    <start> channel is set against the sum of the others.

    Returns (scores (T, h, w), foreground (h, w) bool or None): a position is
    foreground where the aggregated <start> score is below the others'.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not refined:
        raise ValueError("no attention maps were given")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    tok_acc = fore_acc = None
    for i, r in enumerate(refined):
        r = r[None] if r.dim() == 2 else r
        grid = grids[i] if grids is not None else _square(r.shape[-2])
        m = _resized(r, grid, hw)
        if aggregation == "smooth_meannorm":
            m = smooth(m)
        cond = m[-1]
        pair = torch.stack([m[0, 0], m[0, 1:].sum(dim=0)]) if foreground else None
        if aggregation == "smooth_meannorm":
            cond = cond / (cond.mean(dim=(-2, -1), keepdim=True) + 1e-8)
            if pair is not None:
                pair = pair / pair.mean(dim=(-2, -1), keepdim=True)
        tok_acc = cond if tok_acc is None else tok_acc + cond
        if pair is not None:
            fore_acc = pair if fore_acc is None else fore_acc + pair
    n = len(refined)
    scores = tok_acc / n
    fore = None if fore_acc is None else fore_acc / n
    if aggregation == "mean":
        scores = scores / scores.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        if fore is not None:
            fore = fore / fore.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return scores, (None if fore is None else fore[0] < fore[1])


def combine_layers(
    refined: Sequence[torch.Tensor],
    size: int | tuple[int, int] = 32,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Eqs. 4-5 on one row's refined maps C^_l (L_l, T): resize to one grid, average
    over layers, renormalise each token channel over space. Returns (T, h, w)."""
    return aggregate(refined, size, grids=grids)[0]


def token_scores(
    cross_maps: Sequence[torch.Tensor],
    self_maps: Sequence[torch.Tensor],
    size: int | tuple[int, int] = 32,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
    refinement: str = "s",
    aggregation: str = "mean",
) -> torch.Tensor:
    """(T, h, w) per-token scores of one row from its (L, T) cross and (L, L) self maps."""
    if len(cross_maps) != len(self_maps):
        raise ValueError(f"{len(cross_maps)} cross-attention maps but {len(self_maps)} self maps")
    refined = []
    for i, (c, s) in enumerate(zip(cross_maps, self_maps, strict=True)):
        if s.shape != (c.shape[0], c.shape[0]):
            raise ValueError(f"layer {i}: self map {tuple(s.shape)} does not match "
                             f"cross map {tuple(c.shape)}")
        refined.append(refine(c, s, refinement))
    return aggregate(refined, size, grids=grids, aggregation=aggregation)[0]


def latent_semantic_map(
    cross_maps: Sequence[torch.Tensor],
    self_maps: Sequence[torch.Tensor],
    concept_tokens: Sequence[Sequence[int]],
    size: int | tuple[int, int] = 32,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
    candidate_tokens: Sequence[int] | None = None,
    ca_scale: float = 1.0,
    refinement: str = "s",
    aggregation: str = "mean",
) -> torch.Tensor:
    """Label map (h, w): i where a token of concept i has the top score, else 0.

    `candidate_tokens` are the token positions competing (default all); the paper
    preset passes the prompt's own tokens, leaving out <start> and padding.
    `ca_scale` < 1 down-weights non-concept candidates first.
    """
    scores = token_scores(cross_maps, self_maps, size, grids=grids, refinement=refinement,
                          aggregation=aggregation)
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


def regions_from_scores(scores: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                        label_of: torch.Tensor, foreground: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits (T, h, w) bool, labels (h, w) long) from (T, h, w) scores.

    hits[t] marks where token t's weighted score is the maximum (ties kept), inside
    `foreground` when given; labels[p] is the highest concept whose token hits p, or 0.
    """
    weighted = scores * scale[:, None, None].to(scores.dtype)
    weighted = weighted + bias[:, None, None].to(scores.dtype)
    hits = weighted == weighted.amax(dim=0, keepdim=True)
    if foreground is not None:
        hits = hits & foreground
    labels = (hits.long() * label_of[:, None, None]).amax(dim=0)
    return hits, labels


def labels_from_scores(scores: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                       label_of: torch.Tensor) -> torch.Tensor:
    """The label map of `regions_from_scores`, without a foreground constraint."""
    return regions_from_scores(scores, bias, scale, label_of)[1]


def semantic_regions(
    cross: Sequence[torch.Tensor],
    selfs: Sequence,
    grids: Sequence[tuple[int, int]],
    size: tuple[int, int],
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    refinement: str = "s",
    aggregation: str = "mean",
    foreground: bool = False,
    foreground_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step's map from the recorded attention maps: (hits, labels, foreground).

    `cross` holds (R, L, T) maps; `selfs` the matching (R, L, L) self maps or
    (q, k, scale) to multiply without forming them. With `foreground` the maps'
    row 0 is the uncond branch and a foreground is computed; `foreground_mask`
    also keeps every token's region inside it.
    """
    refined = [refine(c, s, refinement) if isinstance(s, torch.Tensor)
               else refine_by_self_attention(c, *s, refinement=refinement)
               for c, s in zip(cross, selfs, strict=True)]
    scores, fore = aggregate(refined, size, grids=grids, aggregation=aggregation,
                             foreground=foreground)
    hits, labels = regions_from_scores(scores, *tables,
                                       foreground=fore if foreground_mask else None)
    return hits, labels, fore
