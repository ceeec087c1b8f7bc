"""Where things are in an SD UNet: the grid of each level, and which layers the method
modifies (the one place a layer name is tested)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["grid_levels", "level_grid", "grid_for_tokens", "is_reference_layer",
           "modified_levels"]


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


def is_reference_layer(name: str, reference_layers: Sequence[str]) -> bool:
    """Whether the attention module `name` (no ".processor" suffix) is a self-attention
    layer the references feed: an `attn1` under one of the `reference_layers` prefixes."""
    return name.endswith("attn1") and any(name.startswith(p + ".") for p in reference_layers)


def modified_levels(unet, reference_layers: Sequence[str]) -> dict[int, set[int]] | None:
    """UNet level (0 = latent grid) -> head dims of the modified self-attention layers
    there, read from the module names; None when a name does not tell its level."""
    out: dict[int, set[int]] = {}
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    for name, module in unet.named_modules():
        if not is_reference_layer(name, reference_layers):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = n_up - 1 - int(parts[1])
        elif parts[0] == "mid_block":
            level = n_down - 1
        else:
            return None
        out.setdefault(level, set()).add(module.to_q.out_features // module.heads)
    return out
