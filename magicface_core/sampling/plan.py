"""A fast-loop plan: the static buffers, attention state and captured graph of one
call signature (`PlanKey`). A step is a function of the buffers only, so on CUDA it
is captured once and replayed for every step of every call with that signature."""

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
    layout: BatchLayout
    riding: tuple[int, ...]  # concepts computed in the batch, in row order
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

    latents: torch.Tensor  # (1, C, h, w): x_t in, x_{t-1} out
    embeds: torch.Tensor  # (rows, 77, D): text embeddings in batch-row order
    t: torch.Tensor  # () long: this step's timestep
    coef: torch.Tensor  # (4,) fp32: this step's DDIM coefficients
    g: torch.Tensor  # () fp32: the guidance scale
    labels: torch.Tensor  # (map h, map w) long: the last step's semantic map
    refs: torch.Tensor | None = None  # (riding, C, h, w): noised reference latents
    is_rsa: torch.Tensor | None = None  # () bool: RSA (True) or RBA this step
    bias_table: dict[Grid, torch.Tensor] = field(default_factory=dict)  # (N+2, Lk) dense
    q_table: dict[tuple[Grid, int], torch.Tensor] = field(default_factory=dict)  # (N+2, p)
    k_cols: dict[tuple[Grid, int], torch.Tensor] = field(default_factory=dict)  # (Lk, p)
    kv: dict[str, dict[int, KV]] = field(default_factory=dict)  # cached refs' K/V, a step
    token_bias: torch.Tensor | None = None  # (77,): -inf on tokens that do not compete
    token_scale: torch.Tensor | None = None  # (77,): ca_scale on non-concept tokens
    label_of: torch.Tensor | None = None  # (77,) long: the concept owning each token

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
    graph: Any = None
    graph_capture: dict = field(default_factory=dict)
    pool: Any = None

    @classmethod
    def build(cls, key: PlanKey, unet, entries: list, max_tokens: int) -> Plan:
        """Allocate the buffers and attention state for `key`. `entries`: each concept's
        cache entry or None (riding); cached K/V get buffers shaped like the entry."""
        device, dtype = torch.device(key.device), getattr(torch, key.dtype)
        c = unet.config.in_channels
        b = StepBuffers(
            latents=torch.zeros(1, c, *key.latent_hw, device=device, dtype=dtype),
            embeds=torch.zeros(key.embeds_shape, device=device, dtype=dtype),
            t=torch.zeros((), dtype=torch.long, device=device),
            coef=torch.zeros(4, dtype=torch.float32, device=device),
            g=torch.zeros((), dtype=torch.float32, device=device),
            labels=torch.zeros(key.map_hw, dtype=torch.long, device=device))
        if key.riding:
            b.refs = torch.zeros(len(key.riding), c, *key.latent_hw, device=device,
                                 dtype=dtype)
        levels, folded = _bias_levels(key, unet)
        plan = cls(key, b, None, None, BiasSteering(), levels, folded)
        if key.n:
            plan._build_reference_state(entries, max_tokens, device, dtype)
        if device.type == "cuda":
            plan.pool = torch.cuda.graph_pool_handle()
        return plan

    def _build_reference_state(self, entries, max_tokens, device, dtype) -> None:
        key, b, n = self.key, self.buffers, self.key.n
        self.recorder = MapRecorder(key.latent_hw, key.map_hw, key.layout, defer_self_maps=True)
        b.is_rsa = torch.zeros((), dtype=torch.bool, device=device)
        for grid, dims in self.folded.items():
            for d in dims:
                b.q_table[grid, d] = folded_query_table(n, head_dim=d, dtype=dtype,
                                                        device=device)
                b.k_cols[grid, d] = torch.zeros(grid[0] * grid[1] * (n + 1),
                                                b.q_table[grid, d].shape[-1], dtype=dtype,
                                                device=device)
        for grid in (g for g in self.levels if g not in self.folded):
            lq = grid[0] * grid[1]
            b.bias_table[grid] = torch.zeros(n + 2, lq * (n + 1), dtype=dtype, device=device)
        for j, e in enumerate(entries):
            if e is None:
                continue
            for name, (k, v) in e.steps[0].items():
                b.kv.setdefault(name, {})[j] = (
                    torch.zeros(k.shape, dtype=dtype, device=device),
                    torch.zeros(v.shape, dtype=dtype, device=device))
        self.refs = ReferenceKV(key.layout, cached=b.kv,
                                captured={} if key.riding else None)
        b.token_bias = torch.zeros(max_tokens, device=device)
        b.token_scale = torch.ones(max_tokens, device=device)
        b.label_of = torch.zeros(max_tokens, dtype=torch.long, device=device)

    # -- per call ---------------------------------------------------------------------
    def fill(self, call: PreparedCall, embeds: torch.Tensor) -> None:
        """This call's inputs into the buffers: z_T, embeddings, guidance scale, and
        (with concepts) the bias tables from its masks and weights, the token tables."""
        b = self.buffers
        b.latents.copy_(call.latents)
        b.embeds.copy_(embeds)
        b.g.fill_(float(call.config.guidance_scale))
        b.labels.zero_()
        if not self.key.n:
            return
        device, dtype = b.latents.device, b.latents.dtype
        weights = [r.weight for r in call.refs]
        for grid in self.levels:
            masks = masks_for_grid([r.mask for r in call.refs], grid, device)
            lq = grid[0] * grid[1]
            if grid in self.folded:
                for d in self.folded[grid]:
                    b.k_cols[grid, d].copy_(folded_key_columns(
                        lq, masks, weights, head_dim=d, dtype=dtype, device=device))
                continue
            b.bias_table[grid].copy_(rba_table(lq, masks, weights, dtype=dtype, device=device,
                                               rsa_row=True))
        for buf, table in zip((b.token_bias, b.token_scale, b.label_of), call.tables,
                              strict=True):
            buf.copy_(table)

    def processors(self) -> tuple[Callable[[str], object], Callable[[str], object]]:
        """Factories for the reference layers' and the other layers' processors."""
        variant = FoldedBiasProcessor if self.folded else DenseBiasProcessor
        return (lambda name: variant(name, self.recorder, self.refs, self.steering),
                lambda name: RecordingAttnProcessor(name, self.recorder))

    def captured_kv(self) -> dict:
        return dict(self.refs.captured) if self.refs and self.refs.captured is not None else {}

    # -- the step ---------------------------------------------------------------------
    def step(self, unet_call: Callable, call: PreparedCall) -> None:
        """The whole step as a function of the buffers: UNet, semantic map, CFG, DDIM.

        One code path for RSA and RBA steps (a per-query bias gathered from a table
        whose last row is RSA's), so a plan has a single CUDA graph / compiled graph.
        """
        b, rows = self.buffers, self.key.layout.target_rows
        if self.recorder is not None:
            self._steer()
        x = b.latents
        parts = [x] * rows + ([b.refs] if b.refs is not None else [])
        eps = unet_call(torch.cat(parts), b.t, encoder_hidden_states=b.embeds,
                        return_dict=False)[0][:rows]
        hits = labels = fore = None
        if self.recorder is not None:
            hits, labels, fore = step_map(self.recorder, call,
                                          (b.token_bias, b.token_scale, b.label_of))
        noise_pred = guided_noise(eps, call, b.g, hits, fore)
        x.copy_(ddim_step(x, noise_pred, b.coef, self.key.prediction_type))
        if labels is not None:
            b.labels.copy_(labels)

    def _steer(self) -> None:
        """Reset the map recorder and gather this step's per-query bias (RSA's row on
        RSA steps, the last map's groups on RBA steps)."""
        b, st, n = self.buffers, self.steering, self.key.n
        self.recorder.enabled = True
        self.recorder.reset()
        if self.refs.captured is not None:
            self.refs.captured.clear()
        for grid in self.levels:
            groups = torch.where(b.is_rsa, n + 1, groups_for_grid(b.labels, grid))
            if grid in self.folded:
                for d in self.folded[grid]:
                    st.folded[grid, d] = (b.q_table[grid, d][groups], b.k_cols[grid, d])
            else:
                st.dense[grid] = b.bias_table[grid][groups]


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
