"""What one `generate` call shares with its attention processors, passed explicitly:
the batch layout, the attention maps recorded for the semantic map, where each
reference's K/V come from, and each processor variant's per-step inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..unet_layout import grid_for_tokens
from .bias import groups_for_grid, masks_for_grid

__all__ = ["BatchLayout", "MapRecorder", "ReferenceKV", "MaskSteering", "BiasSteering",
           "head_mean_probs"]

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BatchLayout:
    """The rows of every UNet call: the target rows first (uncond, cond with CFG; cond
    alone without), then one row per reference riding in the batch."""

    target_rows: int  # 2 with CFG, 1 without
    ref_rows: tuple[int | None, ...]  # concept i's row, or None when its K/V are cached
    map_rows: tuple[int, ...]  # consecutive rows whose attention maps the map reads

    @classmethod
    def build(cls, do_cfg: bool, n_concepts: int, riding: Sequence[int],
              foreground: bool = False) -> BatchLayout:
        """`riding`: the concepts computed in the batch, in row order. `foreground`: the
        map also reads the uncond row (row 0), for its foreground."""
        t = 2 if do_cfg else 1
        rows: list[int | None] = [None] * n_concepts
        for pos, i in enumerate(riding):
            rows[i] = t + pos
        return cls(t, tuple(rows), (0, 1) if foreground and do_cfg else (t - 1,))

    @property
    def cond_row(self) -> int:
        return self.target_rows - 1

    @property
    def n_concepts(self) -> int:
        return len(self.ref_rows)

    def map_slice(self, x: torch.Tensor) -> torch.Tensor:
        # A slice, not a list index: indexing by a list copies the index to the device,
        # which a CUDA graph cannot capture.
        return x[self.map_rows[0] : self.map_rows[-1] + 1]


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(s Q K^T) averaged over heads, per batch row: (B, Lq, Lk) in fp32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return scores.softmax(dim=-1).mean(dim=1)


@dataclass
class MapRecorder:
    """The attention maps one step's semantic map reads, per transformer block: the map
    rows' head-averaged cross-attention map (R, L, T), and their self-attention map
    (R, L, L), or with `defer_self_maps` the (q, k, scale) that make it, so the fast
    loop never forms S."""

    latent_hw: tuple[int, int]
    map_hw: tuple[int, int]
    layout: BatchLayout
    defer_self_maps: bool = False
    enabled: bool = False
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    selfs: dict[str, Any] = field(default_factory=dict)

    def wants(self, tokens: int) -> bool:
        return self.enabled and tokens <= self.map_hw[0] * self.map_hw[1]

    def record_cross(self, block: str, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        rows = self.layout.map_slice
        self.cross[block] = head_mean_probs(rows(q), rows(k), scale)

    def record_self(self, block: str, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        qr, kr = self.layout.map_slice(q), self.layout.map_slice(k)
        self.selfs[block] = ((qr, kr, scale) if self.defer_self_maps
                             else head_mean_probs(qr, kr, scale))

    def recorded(self) -> tuple[list[torch.Tensor], list[Any], list[tuple[int, int]]]:
        """This step's (cross maps, self maps, grids), paired by transformer block."""
        blocks = [b for b in self.cross if b in self.selfs]
        if not blocks:
            raise RuntimeError("no attention maps were recorded: the UNet has no "
                               "transformer block at or below the semantic-map grid")
        cross = [self.cross[b] for b in blocks]
        grids = [grid_for_tokens(c.shape[-2], self.latent_hw) for c in cross]
        return cross, [self.selfs[b] for b in blocks], grids

    def reset(self) -> None:
        self.cross.clear()
        self.selfs.clear()


@dataclass
class ReferenceKV:
    """Where each concept's K/V come from at a modified layer: its batch row, or the
    cache (`cached`: layer -> {concept: (k, v)}, refilled every step). When `captured`
    is set, the riding rows' K/V are kept there on the way (to fill the cache)."""

    layout: BatchLayout
    cached: dict[str, dict[int, KV]] = field(default_factory=dict)
    captured: dict[str, dict[int, KV]] | None = None

    def gather(self, layer: str, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ref_k, ref_v = [], []
        for i, row in enumerate(self.layout.ref_rows):
            if row is None:
                k_i, v_i = self.cached[layer][i]
            else:
                k_i, v_i = k[row : row + 1], v[row : row + 1]
                if self.captured is not None:
                    self.captured.setdefault(layer, {})[i] = (k_i, v_i)
            ref_k.append(k_i)
            ref_v.append(v_i)
        return ref_k, ref_v


@dataclass
class MaskSteering:
    """The reference loop's per-step input: RSA from the concepts' masks and weights,
    or, once `rba` is set and a label map exists, RBA grouped by that map."""

    weights: list[float]
    masks: list[torch.Tensor]  # pixel-resolution bool masks, one per concept
    rba: bool = False
    labels: torch.Tensor | None = None  # the semantic map (map grid) driving RBA
    _masks: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    _groups: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def masks_at(self, grid: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
        if grid not in self._masks:
            self._masks[grid] = masks_for_grid(self.masks, grid, device)
        return self._masks[grid]

    def groups_at(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if not self.rba or self.labels is None:
            return None
        if grid not in self._groups:
            self._groups[grid] = groups_for_grid(self.labels, grid)
        return self._groups[grid]

    def set_labels(self, labels: torch.Tensor | None) -> None:
        self.labels = labels
        self._groups.clear()


@dataclass
class BiasSteering:
    """The fast loop's per-step input, made outside the UNet: the cond row's dense
    bias per grid (Lq, Lk), and the folded columns per (grid, head dim)."""

    dense: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    folded: dict[tuple[tuple[int, int], int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
