"""What both loops do inside a step after the UNet, and what they return."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..attention.state import MapRecorder
from ..guidance import cfg, region_adaptive_cfg
from ..segmentation import semantic_regions
from .prepare import PreparedCall

__all__ = ["SampleOutput", "StepEndCallback", "step_map", "guided_noise"]


# After each step: (step index, timestep, the latents after the step) -> replacement
# latents or None (diffusers' callback_on_step_end, without the pipeline argument).
# Both loops hand over a tensor of the callback's own (it may keep it, or edit it in
# place: the edit counts as a replacement).
StepEndCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class SampleOutput:
    latents: torch.Tensor  # (1, C, h, w), the final latents before VAE decoding
    semantic_maps: list[torch.Tensor] = field(default_factory=list)  # (h, w) long, CPU
    cache_hits: int = 0  # references whose K/V came from the cache
    cache_misses: int = 0  # references computed and stored in the cache


def step_map(recorder: MapRecorder, call: PreparedCall, tables=None, job: int = 0):
    """This step's semantic map of job `job` from the recorded attention maps: (hits,
    labels, foreground); see segmentation.semantic_regions. `tables` overrides the
    call's token tables (the fast loop keeps them in static buffers)."""
    cross, selfs, grids = recorder.recorded(job)
    c = call.config
    return semantic_regions(cross, selfs, grids, call.map_hw,
                            call.tables if tables is None else tables,
                            refinement=c.map_refinement, aggregation=c.map_aggregation,
                            foreground=recorder.layout.foreground,
                            foreground_mask=bool(c.foreground_mask))


def guided_noise(eps: torch.Tensor, call: PreparedCall, scale, hits=None,
                 foreground=None) -> torch.Tensor:
    """The target's noise prediction from its UNet rows: plain, CFG, or (with a map and
    region guidance on) region-adaptive CFG. `scale` is a float or a device tensor."""
    if not call.do_cfg:
        return eps
    eps_u, eps_c = eps.chunk(2)
    c = call.config
    if c.region_guidance and hits is not None:
        return region_adaptive_cfg(eps_u, eps_c, scale, hits, foreground,
                                   c.region_guidance_min, c.region_guidance_max,
                                   c.region_guidance_cap)
    return cfg(eps_u, eps_c, scale)
