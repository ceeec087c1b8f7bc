"""A fast-loop plan: the static buffers, attention state and captured graph of one
call signature (`PlanKey`). A step is a function of the buffers only, so on CUDA it
is captured once and replayed for every step of every call with that signature.

A plan samples `jobs` images together (the layout's jobs, one UNet batch): every
per-image input (z_T, embeddings, guidance scale, masks and weights, token tables,
label map) has a leading job dim; solo sampling is one job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention import (
    BatchLayout,
    BiasSteering,
    DenseBiasProcessor,
    FoldedBiasProcessor,
    MapRecorder,
    RecordingAttnProcessor,
    ReferenceKV,
    folded_key_columns,
    folded_query_table,
    masks_for_grid,
    rba_table,
)
from ..attention.bias import groups_for_grid
from ..ddim import ddim_step
from ..unet_layout import grid_levels, modified_levels
from .prepare import PreparedCall
from .steps import guided_noise, step_map

__all__ = ["PlanKey", "StepBuffers", "Plan"]

Grid = tuple[int, int]
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PlanKey:
    """Everything a captured step depends on besides its buffers' values."""

    latent_hw: Grid
    map_hw: Grid
    layout: BatchLayout  # the jobs, and where each concept's K/V come from
    reference_layers: tuple[str, ...]
    embeds_shape: tuple[int, ...]
    dtype: str
    device: str
    prediction_type: str
    # Map and guidance options read inside the step.
    map_options: tuple  # (refinement, aggregation, foreground_mask)
    guidance_options: tuple  # (region_guidance, min, max, cap)
    use_graphs: bool
    compiled: bool
    fold: bool  # the folded bias, on levels of at least fold_min_tokens queries
    fold_min_tokens: int

    @property
    def n(self) -> int:
        return self.layout.n_concepts


@dataclass
class StepBuffers:
    """The step's inputs and outputs, each a tensor at a fixed address."""

    latents: torch.Tensor  # (jobs, C, h, w): x_t in, x_{t-1} out
    embeds: torch.Tensor  # (rows, 77, D): text embeddings in batch-row order
    t: torch.Tensor  # () long: this step's timestep
    coef: torch.Tensor  # (4,) fp32: this step's DDIM coefficients
    g: torch.Tensor  # (jobs,) fp32: each job's guidance scale
    labels: torch.Tensor  # (jobs, map h, map w) long: the last step's semantic maps
    refs: torch.Tensor | None = None  # (riding, C, h, w): noised reference latents
    is_rsa: torch.Tensor | None = None  # () bool: RSA (True) or RBA this step
    # (jobs, N+2, Lk) dense bias tables; the folded form's (N+2, p) query table and
    # (jobs, Lk, p) key columns.
    bias_table: dict[Grid, torch.Tensor] = field(default_factory=dict)
    q_table: dict[tuple[Grid, int], torch.Tensor] = field(default_factory=dict)
    k_cols: dict[tuple[Grid, int], torch.Tensor] = field(default_factory=dict)
    kv: dict[str, dict[int, KV]] = field(default_factory=dict)  # cache slots' K/V, a step
    token_bias: torch.Tensor | None = None  # (jobs, 77): -inf on tokens that do not compete
    token_scale: torch.Tensor | None = None  # (jobs, 77): ca_scale on non-concept tokens
    label_of: torch.Tensor | None = None  # (jobs, 77) long: the concept owning each token

    def written(self) -> list[torch.Tensor]:
        """The buffers a step writes (restored after a graph's warm-up run)."""
        return [self.latents, self.labels]


@dataclass
class Plan:
    key: PlanKey
    buffers: StepBuffers
    recorder: MapRecorder | None
    refs: ReferenceKV | None
    steering: BiasSteering
    levels: list[Grid]  # grids holding modified layers
    folded: dict[Grid, list[int]]  # folded grid -> head dims of its modified layers
    # Captured CUDA graphs by variant (with or without the semantic map), each with
    # the tensors holding the riding references' K/V it writes.
    graphs: dict[Any, tuple[Any, dict]] = field(default_factory=dict)
    pool: Any = None

    @classmethod
    def build(cls, key: PlanKey, unet, slots: list, max_tokens: int) -> Plan:
        """Allocate the buffers and attention state for `key`. `slots`: the cache
        entries the layout's slots hold; their K/V get buffers shaped like the entry."""
        device, dtype = torch.device(key.device), getattr(torch, key.dtype)
        c, jobs = unet.config.in_channels, key.layout.jobs
        b = StepBuffers(
            latents=torch.zeros(jobs, c, *key.latent_hw, device=device, dtype=dtype),
            embeds=torch.zeros(key.embeds_shape, device=device, dtype=dtype),
            t=torch.zeros((), dtype=torch.long, device=device),
            coef=torch.zeros(4, dtype=torch.float32, device=device),
            g=torch.zeros(jobs, dtype=torch.float32, device=device),
            labels=torch.zeros(jobs, *key.map_hw, dtype=torch.long, device=device))
        riding = key.embeds_shape[0] - key.layout.target_total
        if riding:
            b.refs = torch.zeros(riding, c, *key.latent_hw, device=device, dtype=dtype)
        levels, folded = _bias_levels(key, unet)
        plan = cls(key, b, None, None, BiasSteering(), levels, folded)
        if key.n:
            plan._build_reference_state(slots, max_tokens, device, dtype)
        if device.type == "cuda":
            plan.pool = torch.cuda.graph_pool_handle()
        return plan

    def _build_reference_state(self, slots, max_tokens, device, dtype) -> None:
        key, b, n, jobs = self.key, self.buffers, self.key.n, self.key.layout.jobs
        self.recorder = MapRecorder(key.latent_hw, key.map_hw, key.layout, defer_self_maps=True)
        b.is_rsa = torch.zeros((), dtype=torch.bool, device=device)
        for grid, dims in self.folded.items():
            for d in dims:
                b.q_table[grid, d] = folded_query_table(n, head_dim=d, dtype=dtype,
                                                        device=device)
                b.k_cols[grid, d] = torch.zeros(jobs, grid[0] * grid[1] * (n + 1),
                                                b.q_table[grid, d].shape[-1], dtype=dtype,
                                                device=device)
        for grid in (g for g in self.levels if g not in self.folded):
            lq = grid[0] * grid[1]
            b.bias_table[grid] = torch.zeros(jobs, n + 2, lq * (n + 1), dtype=dtype,
                                             device=device)
        for slot, e in enumerate(slots):
            for name, (k, v) in e.steps[0].items():
                b.kv.setdefault(name, {})[slot] = (
                    torch.zeros(k.shape, dtype=dtype, device=device),
                    torch.zeros(v.shape, dtype=dtype, device=device))
        riding = key.embeds_shape[0] > key.layout.target_total
        self.refs = ReferenceKV(key.layout, cached=b.kv, captured={} if riding else None)
        b.token_bias = torch.zeros(jobs, max_tokens, device=device)
        b.token_scale = torch.ones(jobs, max_tokens, device=device)
        b.label_of = torch.zeros(jobs, max_tokens, dtype=torch.long, device=device)

    # -- per call ---------------------------------------------------------------------
    def fill(self, calls: list[PreparedCall], embeds: torch.Tensor) -> None:
        """The jobs' inputs into the buffers: z_T, embeddings, guidance scales, and
        (with concepts) the bias tables from their masks and weights, the token
        tables."""
        b = self.buffers
        b.latents.copy_(torch.cat([c.latents for c in calls]))
        b.embeds.copy_(embeds)
        b.g.copy_(torch.tensor([float(c.config.guidance_scale) for c in calls]))
        b.labels.zero_()
        if not self.key.n:
            return
        device, dtype = b.latents.device, b.latents.dtype
        for j, call in enumerate(calls):
            weights = [r.weight for r in call.refs]
            for grid in self.levels:
                masks = masks_for_grid([r.mask for r in call.refs], grid, device)
                lq = grid[0] * grid[1]
                if grid in self.folded:
                    for d in self.folded[grid]:
                        b.k_cols[grid, d][j].copy_(folded_key_columns(
                            lq, masks, weights, head_dim=d, dtype=dtype, device=device))
                    continue
                b.bias_table[grid][j].copy_(rba_table(lq, masks, weights, dtype=dtype,
                                                      device=device, rsa_row=True))
            for buf, table in zip((b.token_bias, b.token_scale, b.label_of), call.tables,
                                  strict=True):
                buf[j].copy_(table)

    def processors(self) -> tuple[Callable[[str], object], Callable[[str], object]]:
        """Factories for the reference layers' and the other layers' processors."""
        variant = FoldedBiasProcessor if self.folded else DenseBiasProcessor
        return (lambda name: variant(name, self.recorder, self.refs, self.steering),
                lambda name: RecordingAttnProcessor(name, self.recorder))

    def captured_kv(self) -> dict:
        return dict(self.refs.captured) if self.refs and self.refs.captured is not None else {}

    # -- the step ---------------------------------------------------------------------
    def step(self, unet_call: Callable, calls: list[PreparedCall], with_map: bool = True
             ) -> None:
        """The whole step as a function of the buffers: UNet, semantic maps, CFG, DDIM,
        for every job at once (one UNet batch; maps and guidance per job).

        One code path for RSA and RBA steps (a per-query bias gathered from a table
        whose last row is RSA's), so a plan has one CUDA graph / compiled graph per
        variant: with the semantic map, or (`with_map` False: RSA steps before the last
        one when no map is kept and region guidance is off) without recording any
        attention map or computing the map.
        """
        b, lay = self.buffers, self.key.layout
        rows = lay.target_rows
        if self.recorder is not None:
            self._steer(with_map)
        x = b.latents
        targets = x.repeat_interleave(rows, dim=0) if rows > 1 else x
        batch = targets if b.refs is None else torch.cat([targets, b.refs])
        eps = unet_call(batch, b.t, encoder_hidden_states=b.embeds,
                        return_dict=False)[0][: lay.target_total]
        preds, labels = [], []
        for j, call in enumerate(calls):
            hits = fore = None
            if self.recorder is not None and with_map:
                hits, label, fore = step_map(
                    self.recorder, call, (b.token_bias[j], b.token_scale[j], b.label_of[j]),
                    job=j)
                labels.append(label)
            preds.append(guided_noise(eps[j * rows : (j + 1) * rows], call, b.g[j], hits,
                                      fore))
        noise_pred = preds[0] if len(preds) == 1 else torch.cat(preds)
        x.copy_(ddim_step(x, noise_pred, b.coef, self.key.prediction_type))
        if labels:
            b.labels.copy_(torch.stack(labels))

    def _steer(self, with_map: bool = True) -> None:
        """Reset the map recorder and gather this step's per-query bias, per job (RSA's
        row on RSA steps, the job's last map's groups on RBA steps)."""
        b, st, n = self.buffers, self.steering, self.key.n
        self.recorder.enabled = with_map
        self.recorder.reset()
        if self.refs.captured is not None:
            self.refs.captured.clear()
        for grid in self.levels:
            groups = torch.where(b.is_rsa, n + 1, groups_for_grid(b.labels, grid))  # (B, Lq)
            if grid in self.folded:
                for d in self.folded[grid]:
                    st.folded[grid, d] = (b.q_table[grid, d][groups], b.k_cols[grid, d])
            else:
                table = b.bias_table[grid]
                st.dense[grid] = table.gather(
                    1, groups[..., None].expand(-1, -1, table.shape[-1]))


def _bias_levels(key: PlanKey, unet) -> tuple[list[Grid], dict[Grid, list[int]]]:
    """The grids that hold modified layers, and which of them carry the folded bias
    (grid -> the head dims there)."""
    all_levels = grid_levels(key.latent_hw, len(unet.down_blocks))
    by_level = modified_levels(unet, key.reference_layers)
    if by_level is None:  # an unknown layout: a bias for every level, never folded
        return all_levels, {}
    levels = [all_levels[lv] for lv in sorted(by_level)]
    if not key.fold:
        return levels, {}
    return levels, {all_levels[lv]: sorted(by_level[lv]) for lv in sorted(by_level)
                    if all_levels[lv][0] * all_levels[lv][1] >= key.fold_min_tokens}
