"""The plain reference loop: diffusers' scheduler, explicit attention maps, masks
resized inside the processors, no cache and no graphs. Kept as the oracle the fast
loop is tested against."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..attention import (
    BatchLayout,
    MapRecorder,
    MaskedReferenceProcessor,
    MaskSteering,
    RecordingAttnProcessor,
    ReferenceKV,
    installed_processors,
)
from .prepare import PreparedCall, needs_map, noisy_references
from .steps import SampleOutput, StepEndCallback, guided_noise, step_map

__all__ = ["sample_reference"]


@torch.no_grad()
def sample_reference(unet, vae, call: PreparedCall,
                     on_step: Callable[[int, int], None] | None = None,
                     on_step_end: StepEndCallback | None = None) -> SampleOutput:
    config, n = call.config, call.n
    layout = BatchLayout.build(call.do_cfg, n, range(n), call.foreground)
    recorder = MapRecorder(call.latent_hw, call.map_hw, layout)
    refs = ReferenceKV(layout)
    steering = MaskSteering([r.weight for r in call.refs], [r.mask for r in call.refs])
    embeds = (call.prompt_embeds if not n
              else torch.cat([call.prompt_embeds, call.reference_embeds]))
    noisy = noisy_references(vae, call, list(range(n)))
    scheduler, latents, maps = call.scheduler, call.latents, []

    def run() -> torch.Tensor:
        nonlocal latents
        for i, t in enumerate(call.timesteps):
            inp = scheduler.scale_model_input(torch.cat([latents] * layout.target_rows), t)
            if n:
                steering.rba = i >= call.rsa_steps
                recorder.enabled = needs_map(call, i)
                recorder.reset()
                inp = torch.cat([inp, scheduler.scale_model_input(noisy[i], t)])
            eps = unet(inp, t, encoder_hidden_states=embeds, return_dict=False)[0]
            hits = foreground = None
            if n and recorder.enabled:
                hits, labels, foreground = step_map(recorder, call)
                steering.set_labels(labels)
                if config.return_semantic_maps:
                    maps.append(labels.cpu())
            noise_pred = guided_noise(eps[: layout.target_rows], call, config.guidance_scale,
                                      hits, foreground)
            latents = scheduler.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
            if on_step_end is not None:
                edited = on_step_end(i, t, latents)
                if edited is not None:
                    latents = edited.to(device=latents.device, dtype=latents.dtype)
            if on_step is not None:
                on_step(i + 1, len(call.timesteps))
        return latents

    if not n:
        return SampleOutput(run())
    with installed_processors(
            unet, config.reference_layers,
            reference=lambda name: MaskedReferenceProcessor(name, recorder, refs, steering),
            other=lambda name: RecordingAttnProcessor(name, recorder)):
        return SampleOutput(run(), maps)
