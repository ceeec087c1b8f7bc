"""Where the models are: `to`, diffusers' model CPU offload and VAE memory switches, and
the device and dtype a call runs with."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import MagicFacePipeline

# The package's name, not this module's: the records keep the logger they had before
# the pipeline became a package.
log = logging.getLogger(__package__)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class Offload:
    """enable_model_cpu_offload's state: where the models run, accelerate's hooks in
    the offload order, and the CUDA-graph switch to restore when it is removed."""

    device: torch.device
    hooks: list
    use_cuda_graphs: bool


class DeviceMixin:
    """`MagicFacePipeline`'s placement; `_offload` (None: off) is its offload state."""

    def to(self, *args: Any, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None
           ) -> MagicFacePipeline:
        """Move and/or cast the models, as diffusers' `to`: `to("cuda")`,
        `to(torch.float16)`, `to("cuda", torch.float16)`, or by keyword (`device=`,
        `dtype=` or its diffusers spelling `torch_dtype=`). Returns the pipeline."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise TypeError("to() got dtype and torch_dtype with different values")
        dtype = dtype or torch_dtype
        if len(args) > 2:
            raise TypeError(f"to() takes at most a device and a dtype, got {len(args)} "
                            "positional arguments")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            elif a is not None:
                raise TypeError(f"to() takes a device or a dtype, got {type(a).__name__}")
        if device is not None and self._offload is not None and \
                torch.device(device).type != "cpu":
            # As diffusers: allowed, but it keeps every model on the device, which is
            # what the offload is there to avoid.
            log.warning("model offload is on: moving the pipeline to %s keeps every model "
                        "there; call remove_all_hooks() first, or leave the models on the "
                        "CPU", device)
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kw:
            for m in (self.unet, self.vae, self.text_encoder):
                m.to(**kw)
            self.clear_plans()
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None,
                                 device: str | torch.device = "cuda") -> None:
        """Keep each model on the CPU until it runs (diffusers' model offload, through
        accelerate's hooks): text encoder, then UNet, then VAE on `device`, one at a
        time (`model_cpu_offload_seq`), and all back on the CPU after each call. Saves
        GPU memory at some speed; CUDA graphs are off while it is on (the weights move
        between calls, so a captured graph would read freed memory). Calling it again
        replaces the hooks; `remove_all_hooks()` undoes it."""
        from accelerate import cpu_offload_with_hook

        device = _offload_device(device, gpu_id)
        graphs = self.use_cuda_graphs
        if self._offload is not None:  # hooks on hooks would chain twice
            graphs = self._offload.use_cuda_graphs
            self.remove_all_hooks()
        self.to("cpu")
        models = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        hook, hooks = None, []
        for name in self.model_cpu_offload_seq.split("->"):
            _, hook = cpu_offload_with_hook(models[name], device, prev_module_hook=hook)
            hooks.append(hook)
        self._offload = Offload(device, hooks, graphs)
        self.use_cuda_graphs = False
        self.clear_plans()

    def remove_all_hooks(self) -> None:
        """Undo `enable_model_cpu_offload`: the hooks removed, the models left on the
        CPU (move them with `to`), CUDA graphs as they were before."""
        from accelerate.hooks import remove_hook_from_module

        if self._offload is None:
            return
        for m in (self.text_encoder, self.unet, self.vae):
            remove_hook_from_module(m, recurse=True)
        self.use_cuda_graphs = self._offload.use_cuda_graphs
        self._offload = None
        self.to("cpu")

    def maybe_free_model_hooks(self) -> None:
        """Under model offload, every model back on the CPU (done after each call, as
        diffusers' pipelines do); otherwise nothing."""
        if self._offload is not None:
            for hook in self._offload.hooks:
                hook.offload()

    def enable_vae_slicing(self) -> None:
        """Decode a batch of images one at a time (less memory for several images)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping tiles (large images in little memory)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    @property
    def device(self) -> torch.device:
        """Where a call runs: the UNet's device, or the execution device under
        `enable_model_cpu_offload` (the models then wait on the CPU between uses)."""
        return self._offload.device if self._offload is not None else self.unet.device

    @property
    def _execution_device(self) -> torch.device:
        # diffusers' name for it, read by code written against diffusers pipelines.
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _offload_device(device: str | torch.device, gpu_id: int | None) -> torch.device:
    """enable_model_cpu_offload's device, with diffusers' `gpu_id` spelling of the index."""
    device = torch.device(device)
    if gpu_id is not None and device.index is not None:
        raise ValueError(f"give gpu_id ({gpu_id}) or a device index ({device}), not both")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("enable_model_cpu_offload needs a CUDA device (none is "
                               "available); pass device='cpu' to test the hooks alone")
        device = torch.device("cuda", gpu_id if gpu_id is not None else device.index or 0)
    return device
