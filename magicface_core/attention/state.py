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


Source = tuple[str, int]  # ("row", batch row) or ("slot", cached K/V slot)


@dataclass(frozen=True)
class BatchLayout:
    """The rows of every UNet call for `jobs` images sampled together: each job's
    target rows first, job after job (uncond, cond with CFG; cond alone without), then
    one row per distinct reference riding in the batch. Solo sampling is one job.

    `ref_rows[j][i]` is the row of job j's concept i, or None when its K/V come from
    the cache, as slot `ref_slots[j][i]`. Jobs whose concept has the same reference
    (same cache key) share one row or slot: it is computed once per step."""

    target_rows: int  # per job: 2 with CFG, 1 without
    ref_rows: tuple[tuple[int | None, ...], ...]  # job -> concept -> row or None
    ref_slots: tuple[tuple[int | None, ...], ...] = ()  # job -> concept -> cache slot
    foreground: bool = False  # the map also reads each job's uncond row

    @classmethod
    def build(cls, do_cfg: bool, n_concepts: int, riding: Sequence[int],
              foreground: bool = False) -> BatchLayout:
        """One job. `riding`: the concepts computed in the batch, in row order; the
        others are cached, concept i in slot i. `foreground`: the map also reads the
        uncond row (row 0), for its foreground."""
        t = 2 if do_cfg else 1
        rows: list[int | None] = [None] * n_concepts
        for pos, i in enumerate(riding):
            rows[i] = t + pos
        slots = tuple(None if r is not None else i for i, r in enumerate(rows))
        return cls(t, (tuple(rows),), (slots,), foreground and do_cfg)

    @property
    def jobs(self) -> int:
        return len(self.ref_rows)

    @property
    def n_concepts(self) -> int:
        return len(self.ref_rows[0])

    @property
    def target_total(self) -> int:
        return self.jobs * self.target_rows

    @property
    def map_rows_per_job(self) -> int:
        """1 (the cond row) or 2 (uncond and cond, for the map's foreground)."""
        return 2 if self.foreground else 1

    def source(self, job: int, concept: int) -> Source:
        row = self.ref_rows[job][concept]
        if row is not None:
            return ("row", row)
        return ("slot", self.ref_slots[job][concept])

    # Slices, not list indexes: indexing by a list copies the index to the device,
    # which a CUDA graph cannot capture.
    def cond(self, x: torch.Tensor) -> torch.Tensor:
        """Every job's cond target row, in job order."""
        t = self.target_rows
        return x[t - 1 : self.target_total : t]

    def others(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The rows that run plain attention: the uncond rows, then the references."""
        parts = [x[0 : self.target_total : 2]] if self.target_rows == 2 else []
        if x.shape[0] > self.target_total:
            parts.append(x[self.target_total :])
        return parts

    def map_slice(self, x: torch.Tensor) -> torch.Tensor:
        """The rows the semantic map reads, `map_rows_per_job` per job in job order."""
        return x[: self.target_total] if self.foreground else self.cond(x)

    def job_rows(self, x: torch.Tensor, job: int) -> torch.Tensor:
        """Job `job`'s part of something `map_slice` returned."""
        r = self.map_rows_per_job
        return x[job * r : (job + 1) * r]


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

    def recorded(self, job: int = 0
                 ) -> tuple[list[torch.Tensor], list[Any], list[tuple[int, int]]]:
        """Job `job`'s maps of this step: (cross maps, self maps, grids), paired by
        transformer block."""
        blocks = [b for b in self.cross if b in self.selfs]
        if not blocks:
            raise RuntimeError("no attention maps were recorded: the UNet has no "
                               "transformer block at or below the semantic-map grid")
        rows = self.layout.job_rows
        cross = [rows(self.cross[b], job) for b in blocks]
        selfs = [self.selfs[b] for b in blocks]
        selfs = [(rows(s[0], job), rows(s[1], job), s[2]) if isinstance(s, tuple)
                 else rows(s, job) for s in selfs]
        grids = [grid_for_tokens(c.shape[-2], self.latent_hw) for c in cross]
        return cross, selfs, grids

    def reset(self) -> None:
        self.cross.clear()
        self.selfs.clear()


@dataclass
class ReferenceKV:
    """Where each job's concepts' K/V come from at a modified layer: a batch row, or a
    cache slot (`cached`: layer -> {slot: (k, v)}, refilled every step). When
    `captured` is set, the riding rows' K/V are kept there on the way (layer -> {row:
    (k, v)}), to fill the cache."""

    layout: BatchLayout
    cached: dict[str, dict[int, KV]] = field(default_factory=dict)
    captured: dict[str, dict[int, KV]] | None = None

    def gather(self, layer: str, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per concept, the K/V every job's cond row attends to: (jobs, heads, L_i, d),
        or (1, ...) when all jobs share one reference (broadcast by the attention)."""
        lay = self.layout
        ref_k, ref_v = [], []
        for i in range(lay.n_concepts):
            sources = [lay.source(j, i) for j in range(lay.jobs)]
            pieces = [self._pick(layer, src, k, v) for src in sources]
            if len(set(sources)) == 1:
                k_i, v_i = pieces[0]
            elif _consecutive_rows(sources):
                first = sources[0][1]
                k_i, v_i = k[first : first + len(sources)], v[first : first + len(sources)]
            else:
                k_i = torch.cat([p[0] for p in pieces])
                v_i = torch.cat([p[1] for p in pieces])
            ref_k.append(k_i)
            ref_v.append(v_i)
        return ref_k, ref_v

    def _pick(self, layer: str, source: Source, k: torch.Tensor, v: torch.Tensor) -> KV:
        kind, idx = source
        if kind == "slot":
            return self.cached[layer][idx]
        kv = (k[idx : idx + 1], v[idx : idx + 1])
        if self.captured is not None:
            self.captured.setdefault(layer, {})[idx] = kv
        return kv


def _consecutive_rows(sources: Sequence[Source]) -> bool:
    return (all(kind == "row" for kind, _ in sources)
            and [idx for _, idx in sources] == list(range(sources[0][1],
                                                          sources[0][1] + len(sources))))


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
    """The fast loop's per-step input, made outside the UNet: the cond rows' dense
    bias per grid (jobs, Lq, Lk), and the folded columns per (grid, head dim):
    ((jobs, Lq, p), (jobs, Lk, p))."""

    dense: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    folded: dict[tuple[tuple[int, int], int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
