"""RSA and RBA (Eqs. 2 and 6) as SDPA calls with an additive bias, and the diffusers
attention processors that put them into a UNet.

Tensors are laid out as SDPA wants them: (batch, heads, tokens, head_dim).
The reference bias is *added* after the 1/sqrt(d) scaling (as the authors' code
does): `w_i` on in-mask reference keys, `-inf` elsewhere, 0 on the target's own keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "reference_bias",
    "attend",
    "rsa",
    "rsa_bias",
    "rba",
    "rba_bias",
    "rba_table",
    "MASKED",
    "fold_width",
    "folded_key_columns",
    "folded_query_table",
    "attend_folded",
    "AttentionState",
    "MagicFaceAttnProcessor",
    "RecordingAttnProcessor",
    "grid_for_tokens",
    "grid_levels",
    "level_grid",
]


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


def _check_refs(k: torch.Tensor, ref_k, ref_v, ref_masks, weights) -> None:
    n = len(ref_k)
    if not (len(ref_v) == len(ref_masks) == len(weights) == n):
        raise ValueError("ref_k, ref_v, ref_masks and weights must have the same length")
    for i in range(n):
        if ref_k[i].shape[-2] != ref_masks[i].numel():
            raise ValueError(
                f"reference {i}: {ref_k[i].shape[-2]} keys but a mask of {ref_masks[i].numel()}"
            )
        if ref_k[i].shape != ref_v[i].shape:
            raise ValueError(f"reference {i}: key and value shapes differ")
        if ref_k[i].shape[-1] != k.shape[-1]:
            raise ValueError(f"reference {i}: head dim {ref_k[i].shape[-1]} != {k.shape[-1]}")


def _joined(k: torch.Tensor, v: torch.Tensor, ref_k: Sequence[torch.Tensor],
            ref_v: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[K ; K_1..K_N] and [V ; V_1..V_N], the references broadcast over the batch."""
    b = k.shape[0]
    keys = torch.cat([k, *(rk.expand(b, -1, -1, -1) for rk in ref_k)], dim=-2)
    values = torch.cat([v, *(rv.expand(b, -1, -1, -1) for rv in ref_v)], dim=-2)
    return keys, values


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_k: Sequence[torch.Tensor],
    ref_v: Sequence[torch.Tensor],
    bias: torch.Tensor,
) -> torch.Tensor:
    """One SDPA over [K ; K_1..K_N] with an additive bias of shape (Lk,) or (Lq, Lk)."""
    keys, values = _joined(k, v, ref_k, ref_v)
    if bias.dim() == 1:
        bias = bias.expand(q.shape[-2], -1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)


def rsa_bias(own_tokens: int, ref_masks: Sequence[torch.Tensor], weights: Sequence[float], *,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(L + sum L_i,) bias for RSA: 0 on the target's own keys, B_i on concept i's."""
    own = torch.zeros(own_tokens, dtype=dtype, device=device)
    return torch.cat([own, *reference_bias(ref_masks, weights, dtype=dtype, device=device)])


def rsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_k: Sequence[torch.Tensor],
    ref_v: Sequence[torch.Tensor],
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """Reference-guided self-attention (Eq. 2).

    softmax([sQK^T ; sQK_1^T + B_1 ; ... ; sQK_N^T + B_N]) [V ; V_1 ; ... ; V_N]
    """
    _check_refs(k, ref_k, ref_v, ref_masks, weights)
    if not ref_k:
        return F.scaled_dot_product_attention(q, k, v)
    bias = rsa_bias(k.shape[-2], ref_masks, weights, dtype=q.dtype, device=q.device)
    return attend(q, k, v, ref_k, ref_v, bias)


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


def rba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_k: Sequence[torch.Tensor],
    ref_v: Sequence[torch.Tensor],
    ref_masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    groups: torch.Tensor,
) -> torch.Tensor:
    """Region-grouped blend attention (Eq. 6).

    `groups` (Lq,) holds 0 (background: attends to its own K/V only) or i in 1..N
    (attends to [K ; K_i], [V ; V_i] with bias B_i).
    """
    _check_refs(k, ref_k, ref_v, ref_masks, weights)
    if groups.shape != (q.shape[-2],):
        raise ValueError(f"groups must have shape ({q.shape[-2]},), got {tuple(groups.shape)}")
    if not ref_k:
        return F.scaled_dot_product_attention(q, k, v)
    bias = rba_bias(k.shape[-2], ref_masks, weights, groups, dtype=q.dtype, device=q.device)
    return attend(q, k, v, ref_k, ref_v, bias)


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
    from `folded_key_columns`.
    """
    b, h, _, d = q.shape
    keys, values = _joined(k, v, ref_k, ref_v)
    qf = torch.cat([q, q_cols.to(q.dtype).expand(b, h, -1, -1)], dim=-1)
    kf = torch.cat([keys, k_cols.to(q.dtype).expand(b, h, -1, -1)], dim=-1)
    vf = F.pad(values, (0, q_cols.shape[-1]))
    out = F.scaled_dot_product_attention(qf, kf, vf, scale=d**-0.5)
    return out[..., :d]


def grid_levels(latent_hw: tuple[int, int], n: int = 8) -> list[tuple[int, int]]:
    """The (h, w) grids of the first `n` UNet levels, finest first.

    Each UNet downsample is a stride-2 conv with padding 1, i.e. ceil(x / 2).
    """
    h, w = latent_hw
    out = []
    for _ in range(n):
        out.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def level_grid(latent_hw: tuple[int, int], downscale: int) -> tuple[int, int]:
    """The grid `downscale` (a power of two) times coarser than the latent grid."""
    return grid_levels(latent_hw, downscale.bit_length())[-1]


def grid_for_tokens(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a UNet level with `tokens` positions."""
    for h, w in grid_levels(latent_hw):
        if h * w == tokens:
            return h, w
    raise ValueError(f"{tokens} tokens match no level of a {latent_hw} latent grid")


def _resize_nearest(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    return F.interpolate(x[None, None].float(), size=grid, mode="nearest")[0, 0]


def masks_for_grid(masks: Sequence[torch.Tensor], grid: tuple[int, int],
                   device: torch.device | str) -> list[torch.Tensor]:
    """Pixel masks nearest-resized to a layer grid, flattened to (h*w,) bool."""
    return [(_resize_nearest(m, grid) > 0.5).reshape(-1).to(device) for m in masks]


def groups_for_grid(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A label map nearest-resized to a layer grid, flattened to (h*w,) long."""
    return _resize_nearest(labels, grid).reshape(-1).long()


@dataclass
class AttentionState:
    """What one `generate` call shares with its processors, passed explicitly.

    Batch layout of every UNet call: the target rows first (uncond, cond with CFG;
    cond alone without), then one row per reference concept riding along.
    `ref_rows[i]` is concept i's row, or None when its K/V come from `kv_inputs`
    (the cache). The fast path sets `bias` (grid -> per-query bias, made outside the
    UNet each step) so the processors only read tensors and have one code path.
    """

    latent_hw: tuple[int, int]
    target_rows: int
    cond_row: int
    weights: list[float]
    masks: list[torch.Tensor]  # pixel-resolution bool masks, one per concept
    map_hw: tuple[int, int]
    mode: str = "off"  # "off" | "rsa" | "rba" | "fast" (read `bias`)
    ref_rows: list[int | None] = field(default_factory=list)
    labels: torch.Tensor | None = None  # semantic map (map_hw) driving RBA
    record_maps: bool = False
    # Cached reference K/V for this step: layer name -> {concept index: (k, v)}.
    kv_inputs: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict)
    # When set, the riding references' K/V at each modified layer are stored here.
    capture_kv: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None
    bias: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    # Batch rows whose attention maps the semantic map reads: the cond row, and the
    # uncond row before it when the map needs a foreground (empty: the cond row).
    map_rows: tuple[int, ...] = ()
    # The folded alternative to `bias`: (grid, head dim) -> (query cols, key cols).
    folded: dict[tuple[tuple[int, int], int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    # When set, self-attention "maps" are recorded as the cond row's (q, k, scale) and
    # the semantic map multiplies them into the cross maps with SDPA (never forming S).
    defer_self_maps: bool = False
    cross_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    self_maps: dict[str, Any] = field(default_factory=dict)
    _mask_cache: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    _group_cache: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def n_concepts(self) -> int:
        return len(self.weights)

    def masks_at(self, grid: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
        if grid not in self._mask_cache:
            self._mask_cache[grid] = masks_for_grid(self.masks, grid, device)
        return self._mask_cache[grid]

    def groups_at(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.labels is None:
            return None
        if grid not in self._group_cache:
            self._group_cache[grid] = groups_for_grid(self.labels, grid)
        return self._group_cache[grid]

    def set_labels(self, labels: torch.Tensor | None) -> None:
        self.labels = labels
        self._group_cache.clear()

    def wants_map(self, tokens: int) -> bool:
        return self.record_maps and tokens <= self.map_hw[0] * self.map_hw[1]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # A slice, not a list index: indexing by a list copies the index to the device,
        # which a CUDA graph cannot capture.
        rows = self.map_rows or (self.cond_row,)
        if tuple(rows) != tuple(range(rows[0], rows[-1] + 1)):
            raise ValueError(f"map_rows must be consecutive batch rows, got {rows}")
        return x[rows[0] : rows[-1] + 1]

    def record_cross_map(self, block: str, q: torch.Tensor, k: torch.Tensor,
                         scale: float) -> None:
        """Keep the map rows' head-averaged cross-attention map of `block`: (R, L, T)."""
        self.cross_maps[block] = _head_mean_probs(self._rows(q), self._rows(k), scale)

    def record_self_map(self, block: str, q: torch.Tensor, k: torch.Tensor,
                        scale: float) -> None:
        """Keep the map rows' self-attention map of `block` (R, L, L), or with
        `defer_self_maps` what makes it: (q, k, scale) of those rows."""
        qr, kr = self._rows(q), self._rows(k)
        self.self_maps[block] = ((qr, kr, scale) if self.defer_self_maps
                                 else _head_mean_probs(qr, kr, scale))

    def recorded_maps(self) -> tuple[list[torch.Tensor], list[Any],
                                     list[tuple[int, int]]]:
        """This step's (cross maps, self maps, grids), paired by transformer block.
        A cross map is (R, L, T) for the R map rows; a self map is (R, L, L), or
        (q, k, scale) with `defer_self_maps`."""
        blocks = [b for b in self.cross_maps if b in self.self_maps]
        if not blocks:
            raise RuntimeError("no attention maps were recorded: the UNet has no "
                               "transformer block at or below the semantic-map grid")
        cross = [self.cross_maps[b] for b in blocks]
        grids = [grid_for_tokens(c.shape[-2], self.latent_hw) for c in cross]
        return cross, [self.self_maps[b] for b in blocks], grids

    def reset_maps(self) -> None:
        self.cross_maps.clear()
        self.self_maps.clear()


def _project(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v in (B, heads, L, d) as diffusers' AttnProcessor2_0 computes them."""
    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise NotImplementedError("spatial/group-normed attention is not used by SD UNets")
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    fused = getattr(attn, "fused_projections", False)
    if fused and encoder_hidden_states is None and hasattr(attn, "to_qkv"):
        # One matmul for Q, K and V (diffusers' fuse_qkv_projections).
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    elif fused and encoder_hidden_states is not None and hasattr(attn, "to_kv"):
        query = attn.to_q(hidden_states)
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
    b = hidden_states.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _finish(attn, out: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, length, d = out.shape
    out = out.transpose(1, 2).reshape(b, length, h * d).to(dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _head_mean_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(s Q K^T) averaged over heads, per batch row: (B, Lq, Lk) in fp32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return scores.softmax(dim=-1).mean(dim=1)


def _block_of(name: str) -> str:
    # "...transformer_blocks.0.attn1" -> "...transformer_blocks.0"
    return name.rsplit(".", 1)[0]


class RecordingAttnProcessor:
    """Plain SDPA attention (identical to diffusers' AttnProcessor2_0) that also
    records the cond branch's head-averaged attention map where the semantic map
    needs it (levels no finer than the map grid)."""

    def __init__(self, name: str, state: AttentionState):
        self.name = name
        self.block = _block_of(name)
        self.is_cross = name.endswith("attn2")
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("attention masks and 4-D inputs are not used by SD UNets")
        residual = hidden_states
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        out = F.scaled_dot_product_attention(q, k, v)
        st = self.state
        if st.wants_map(q.shape[-2]):
            if self.is_cross:
                st.record_cross_map(self.block, q, k, attn.scale)
            else:
                st.record_self_map(self.block, q, k, attn.scale)
        return _finish(attn, out, residual, q.dtype)


class MagicFaceAttnProcessor:
    """Self-attention of a modified layer: the cond target row runs RSA or RBA
    against the references' K/V at this layer; every other row (uncond, the
    references themselves) runs plain self-attention, so the reference path is the
    unmodified UNet."""

    def __init__(self, name: str, state: AttentionState):
        self.name = name
        self.block = _block_of(name)
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("attention masks and 4-D inputs are not used by SD UNets")
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name} is not a self-attention layer")
        st = self.state
        residual = hidden_states
        q, k, v = _project(attn, hidden_states, None)
        tokens = q.shape[-2]
        grid = grid_for_tokens(tokens, st.latent_hw)
        c = st.cond_row

        ref_k, ref_v = [], []
        for i, row in enumerate(st.ref_rows):
            if row is None:
                k_i, v_i = st.kv_inputs[self.name][i]
            else:
                k_i, v_i = k[row : row + 1], v[row : row + 1]
                if st.capture_kv is not None:
                    st.capture_kv.setdefault(self.name, {})[i] = (k_i, v_i)
            ref_k.append(k_i)
            ref_v.append(v_i)

        if st.wants_map(tokens):
            st.record_self_map(self.block, q, k, attn.scale)

        if st.mode == "off" or not ref_k:
            out = F.scaled_dot_product_attention(q, k, v)
            return _finish(attn, out, residual, q.dtype)
        def rest(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:c], x[c + 1 :]], dim=0)

        plain = F.scaled_dot_product_attention(rest(q), rest(k), rest(v))
        qc, kc, vc = q[c : c + 1], k[c : c + 1], v[c : c + 1]
        if st.mode == "fast":  # per-query bias made outside the UNet: RSA or RBA
            folded = st.folded.get((grid, q.shape[-1]))
            if folded is not None:
                cond = attend_folded(qc, kc, vc, ref_k, ref_v, *folded)
            else:
                cond = attend(qc, kc, vc, ref_k, ref_v, st.bias[grid])
        else:
            groups = st.groups_at(grid) if st.mode == "rba" else None
            masks = st.masks_at(grid, q.device)
            if groups is None:  # RSA, or the first RBA step before any map exists
                cond = rsa(qc, kc, vc, ref_k, ref_v, masks, st.weights)
            else:
                cond = rba(qc, kc, vc, ref_k, ref_v, masks, st.weights, groups.to(q.device))
        out = torch.cat([plain[:c], cond, plain[c:]], dim=0)
        return _finish(attn, out, residual, q.dtype)
