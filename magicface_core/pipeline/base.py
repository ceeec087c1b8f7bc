"""`MagicFacePipeline`: the one class, made of the package's mixins, and its loading
(`from_pretrained`, `tiny`, `save_pretrained`, `load_pipeline`)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import torch

from ..kv_cache import ReferenceKVCache
from ..models import Components, load_components, save_components, tiny_components
from ..sampling import FastSampler
from .batching import BatchingMixin
from .call import CallMixin
from .device import DeviceMixin, Offload, default_dtype
from .generate import GenerateMixin
from .switches import FastLoopSwitchesMixin


class MagicFacePipeline(FastLoopSwitchesMixin, DeviceMixin, GenerateMixin, BatchingMixin,
                        CallMixin):
    """Training-free customization of SD1.x / SD2.x with one reference per concept.

    One `generate` at a time per pipeline (calls are serialised by a lock): the
    attention processors are installed for the duration of a call.
    """

    # diffusers' class attributes: the model offload order, and the tensors a
    # callback_on_step_end may ask for.
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ("latents",)

    def __init__(self, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any,
                 scheduler: Any, *, model_name: str = "custom") -> None:
        from diffusers import DDIMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = (scheduler if isinstance(scheduler, DDIMScheduler)
                          else DDIMScheduler.from_config(scheduler.config))
        self.model_name = model_name
        self.sam_predictor = None  # set directly, or loaded from config.sam_checkpoint
        # Masks from the concept word (auto_masks.MaskProposer; see enable_auto_masks).
        self.mask_proposer: Any = None
        self._sam_key: tuple[str, str] | None = None
        self._lock = threading.Lock()
        # Reference K/V cache (None: off); see enable_kv_cache.
        self.kv_cache: ReferenceKVCache | None = None
        # Capture each step variant as a CUDA graph (CUDA only; fast path only).
        self.use_cuda_graphs = True
        self.fast_sampler = FastSampler(unet)
        self._offload: Offload | None = None  # see enable_model_cpu_offload
        self._progress_bar_config: dict[str, Any] = {}

    @classmethod
    def from_components(cls, c: Components, model_name: str = "custom") -> MagicFacePipeline:
        return cls(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler,
                   model_name=model_name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *,
                        torch_dtype: torch.dtype | None = None,
                        dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        variant: str | None = None, revision: str | None = None,
                        use_safetensors: bool | None = None,
                        local_files_only: bool | None = None,
                        **kwargs: Any) -> MagicFacePipeline:
        """Load a diffusers SD1.x/SD2.x checkpoint: a local folder or a hub id, with
        diffusers' loading options (`torch_dtype`, `variant`, `revision`,
        `use_safetensors`, `local_files_only`, `cache_dir`, `token`; other keywords go
        to each model's `from_pretrained`). A component given by name (`unet=`,
        `scheduler=`, ...) is used instead of loading it, as in diffusers;
        `safety_checker=None` is accepted (this pipeline has none). `dtype` is an alias
        of `torch_dtype`. Device: `device` (default CPU, as diffusers; move with
        `.to("cuda")`); dtype: fp16 on CUDA, fp32 elsewhere, unless given."""
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise TypeError("from_pretrained() got torch_dtype and its alias dtype with "
                            f"different values ({torch_dtype}, {dtype}): give one, not both")
        device = torch.device(device or "cpu")
        dtype = torch_dtype or dtype or default_dtype(device)
        comps = load_components(pretrained_model_name_or_path, device=device, dtype=dtype,
                                variant=variant, revision=revision,
                                use_safetensors=use_safetensors,
                                local_files_only=local_files_only, **kwargs)
        return cls.from_components(comps, model_name=str(pretrained_model_name_or_path))

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu") -> MagicFacePipeline:
        """Random weights with SD1.5's module names: runs the whole method, makes noise."""
        pipe = cls.from_components(tiny_components(seed), model_name=f"tiny-{seed}")
        return pipe.to(device)

    @property
    def components(self) -> Components:
        """The modules (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`), by
        attribute or by name like diffusers' dict (`c["unet"]`, `dict(c)`, `**c`): e.g.
        `StableDiffusionPipeline(**pipe.components, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)`."""
        return Components(self.unet, self.vae, self.text_encoder, self.tokenizer,
                          self.scheduler)

    def weights_sha256(self) -> str:
        """SHA-256 over every weight of the UNet, VAE and text encoder (names, dtypes,
        shapes and values, in name order): which weights made an image, whatever path
        or hub revision they came from. Reads all weights once (seconds for SD1.5)."""
        h = hashlib.sha256()
        for prefix, module in (("unet", self.unet), ("vae", self.vae),
                               ("text_encoder", self.text_encoder)):
            for name, t in sorted(module.state_dict().items()):
                t = t.detach().contiguous().cpu()
                h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save_pretrained(self, save_directory: str | Path, *, safe_serialization: bool = True,
                        variant: str | None = None) -> Path:
        """Write a diffusers folder (`model_index.json` and one subfolder per component)
        that this class and `StableDiffusionPipeline.from_pretrained` both read."""
        return save_components(self.components, save_directory,
                               safe_serialization=safe_serialization, variant=variant)


def load_pipeline(model: str = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> MagicFacePipeline:
    """The pipeline the CLI, the worker and the benchmarks run: `model` is a hub id, a
    local diffusers folder, or "tiny" (random weights, no download). Device: CUDA when
    available; dtype: fp16 on CUDA, fp32 elsewhere."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model == "tiny":
        pipe = MagicFacePipeline.tiny(seed=0, device=device)
        return pipe.to(dtype=dtype) if dtype is not None else pipe
    return MagicFacePipeline.from_pretrained(model, device=device, dtype=dtype)
