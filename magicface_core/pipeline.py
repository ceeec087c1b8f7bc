"""MagicFacePipeline: loading, the fast-loop switches, and `generate` (validate,
prepare the call, run a loop, decode)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import Concept, GenerationConfig
from .ddim import supports_fast_ddim
from .errors import MagicFaceInputError
from .inputs import check_call, check_noise
from .kv_cache import ReferenceKVCache
from .models import Components, load_components, save_components, tiny_components
from .output import MagicFacePipelineOutput
from .reference import PreparedReference, prepare_reference
from .sampling import FastSampler, make_scheduler, prepare_call, sample_reference
from .sampling.steps import StepEndCallback
from .tokens import word_token_indices

__all__ = ["MagicFacePipeline", "MagicFaceResult", "load_pipeline"]

StepCallback = Callable[[int, int], None]


@dataclass
class MagicFaceResult:
    image: Image.Image
    # One (h, w) long label map per step (0 = background, i = concept i), on the CPU.
    semantic_maps: list[torch.Tensor] = field(default_factory=list)
    latents: torch.Tensor | None = None  # the final latents, before VAE decoding
    concept_tokens: list[list[int]] = field(default_factory=list)
    rsa_steps: int = 0
    masks: list[torch.Tensor] = field(default_factory=list)  # letterboxed concept masks
    cache_hits: int = 0  # references whose K/V came from the cache
    cache_misses: int = 0  # references computed and stored in the cache
    # The config as run: every field the preset picks filled in.
    config: GenerationConfig | None = None


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


class MagicFacePipeline:
    """Training-free customization of SD1.x / SD2.x with one reference per concept.

    One `generate` at a time per pipeline (calls are serialised by a lock): the
    attention processors are installed for the duration of a call.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *,
                 model_name: str = "custom"):
        from diffusers import DDIMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = (scheduler if isinstance(scheduler, DDIMScheduler)
                          else DDIMScheduler.from_config(scheduler.config))
        self.model_name = model_name
        self.sam_predictor = None  # set directly, or loaded from config.sam_checkpoint
        self._sam_key: tuple[str, str] | None = None
        self._lock = threading.Lock()
        # Reference K/V cache (None: off); see enable_kv_cache.
        self.kv_cache: ReferenceKVCache | None = None
        # Capture each step variant as a CUDA graph (CUDA only; fast path only).
        self.use_cuda_graphs = True
        self.fast_sampler = FastSampler(unet)

    # -- the fast loop's switches -----------------------------------------------------
    def enable_kv_cache(self, device_bytes: int = 4 << 30,
                        host_bytes: int = 16 << 30) -> ReferenceKVCache:
        """Cache reference K/V by content hash: a repeated reference skips its
        reference-path rows. Budgets in bytes (GPU tier, then host spill)."""
        self.kv_cache = ReferenceKVCache(device_bytes=device_bytes, host_bytes=host_bytes)
        return self.kv_cache

    def enable_compile(self, mode: str = "default", options: dict | None = None) -> None:
        """torch.compile the UNet for the fast path (falls back to eager when the compiler
        fails). `options` (inductor config, e.g. `{"conv_1x1_as_mm": True}`) replaces
        `mode`."""
        self.fast_sampler.enable_compile(mode, options)

    def disable_compile(self) -> None:
        self.fast_sampler.disable_compile()

    @property
    def is_compiled(self) -> bool:
        return self.fast_sampler.is_compiled

    def clear_plans(self) -> None:
        """Drop the fast loop's buffers and captured graphs (they rebuild on use)."""
        self.fast_sampler.clear_plans()

    def sync_check(self):
        """A context manager: inside it, a host-device sync in the fast loop's steps is
        an error (CUDA only)."""
        return self.fast_sampler.sync_check()

    def fuse_qkv_projections(self) -> None:
        """One matmul for each self-attention's Q, K, V and each cross-attention's K, V
        (diffusers' fused projections; same maths, fewer kernels). Both loops and every
        processor of this library use the fused weights once set."""
        self.unet.fuse_qkv_projections()
        self.clear_plans()

    @property
    def fold_attention_bias(self) -> bool:
        """Fast path: carry RSA/RBA's bias in extra head dims so SDPA runs without a
        mask (flash-eligible, no dense (Lq x Lk) bias). Same output up to the rounding
        of w*sqrt(d) to the model dtype. On by default (measured faster on an H100)."""
        return self.fast_sampler.fold_bias

    @fold_attention_bias.setter
    def fold_attention_bias(self, enabled: bool) -> None:
        self.fast_sampler.fold_bias = bool(enabled)

    @property
    def fold_min_tokens(self) -> int:
        """With `fold_attention_bias`: fold only levels of at least this many query
        tokens (h*w); coarser levels keep the dense bias. 0 folds every level."""
        return self.fast_sampler.fold_min_tokens

    @fold_min_tokens.setter
    def fold_min_tokens(self, tokens: int) -> None:
        if int(tokens) < 0:
            raise MagicFaceInputError(f"fold_min_tokens must be >= 0, got {tokens}")
        self.fast_sampler.fold_min_tokens = int(tokens)

    # -- construction -----------------------------------------------------------------
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
        `use_safetensors`, `local_files_only`; other keywords go to each model's
        `from_pretrained`). `dtype` is an alias of `torch_dtype`. Device: `device`
        (default CPU, as diffusers; move with `.to("cuda")`); dtype: fp16 on CUDA,
        fp32 elsewhere, unless given."""
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise TypeError("give torch_dtype or its alias dtype, not both")
        device = torch.device(device or "cpu")
        dtype = torch_dtype or dtype or _default_dtype(device)
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
        """The modules (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`): a
        named tuple, also usable as a dict (`dict(pipe.components._asdict())`) or to
        build a diffusers `StableDiffusionPipeline`."""
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

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_components(self.components, directory)

    def to(self, *args: Any, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None
           ) -> MagicFacePipeline:
        """Move the models, as diffusers' `to`: `to("cuda")`, `to(torch.float16)`,
        `to("cuda", torch.float16)`, or by keyword."""
        dtype = dtype or torch_dtype
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif a is not None:
                device = a
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kw:
            for m in (self.unet, self.vae, self.text_encoder):
                m.to(**kw)
            self.clear_plans()
        return self

    # -- diffusers' memory switches ----------------------------------------------------
    def enable_model_cpu_offload(self, gpu_id: int | None = None,
                                 device: str | torch.device = "cuda") -> None:
        """Keep each model on the CPU until it runs (diffusers' model offload, through
        accelerate's hooks): text encoder, then UNet, then VAE on `device`, one at a
        time, and all back on the CPU after each call. Saves GPU memory at some speed;
        CUDA graphs are off while it is on (the weights move between calls)."""
        from accelerate import cpu_offload_with_hook

        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("enable_model_cpu_offload needs a CUDA device (none is "
                                   "available); pass device='cpu' to test the hooks alone")
            if gpu_id is not None:
                device = torch.device("cuda", gpu_id)
        self.to("cpu")
        hook = None
        hooks = []
        for model in (self.text_encoder, self.unet, self.vae):
            _, hook = cpu_offload_with_hook(model, device, prev_module_hook=hook)
            hooks.append(hook)
        self._offload = (device, hooks)
        self.use_cuda_graphs = False
        self.clear_plans()

    def _offload_models(self) -> None:
        """After a call under model offload: every model back on the CPU."""
        offload = getattr(self, "_offload", None)
        if offload:
            for hook in offload[1]:
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

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for `__call__`'s progress bar (`disable=True` silences it)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, **getattr(self, "_progress_bar_config", {}))

    @property
    def device(self) -> torch.device:
        """Where a call runs: the UNet's device, or the execution device under
        `enable_model_cpu_offload` (the models then wait on the CPU between uses)."""
        offload = getattr(self, "_offload", None)
        return offload[0] if offload else self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- pieces -----------------------------------------------------------------------
    def make_scheduler(self, config: GenerationConfig):
        """The DDIM scheduler a call with `config` runs (see sampling.make_scheduler)."""
        return make_scheduler(self.scheduler, config)

    def concept_tokens(self, prompt: str, concepts: Sequence[Concept]) -> list[list[int]]:
        return [word_token_indices(self.tokenizer, prompt, c.word) for c in concepts]

    def _sam_factory(self, config: GenerationConfig) -> Callable[[], object] | None:
        if self.sam_predictor is not None:
            return lambda: self.sam_predictor
        if not config.sam_checkpoint:
            return None

        def load():
            from .masks import load_sam_predictor

            key = (config.sam_checkpoint, config.sam_model_type)
            if self._sam_key != key:
                self._sam_predictor_loaded = load_sam_predictor(
                    config.sam_checkpoint, config.sam_model_type, str(self.device))
                self._sam_key = key
            return self._sam_predictor_loaded

        return load

    def prepare_references(self, concepts: Sequence[Concept],
                           config: GenerationConfig) -> list[PreparedReference]:
        sam = self._sam_factory(config)
        return [prepare_reference(c, i, config.height, config.width, sam)
                for i, c in enumerate(concepts)]

    # -- sampling ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        concepts: Sequence[Concept] = (),
        config: GenerationConfig | None = None,
        on_step: StepCallback | None = None,
        *,
        latents: torch.Tensor | None = None,
        reference_noise: torch.Tensor | None = None,
        on_step_end: StepEndCallback | None = None,
    ) -> MagicFaceResult:
        """Sample one image. `on_step(step, total)` runs after every step; an exception
        raised in it aborts the run (the UNet is left as it was) and propagates.

        `latents` (1, C, h, w) replaces the seeded z_T, and `reference_noise`
        (steps, N, C, h, w) the seeded reference-path noise (`reference_noise[i, j]`
        noises concept j's latent at step i), as diffusers' `latents=` does: with
        both, a run of another implementation can be reproduced. The K/V cache keys
        explicit noise by its content. `on_step_end(i, timestep, latents)` runs after
        each step and may return replacement latents.
        """
        # 1. Check and resolve the inputs (every preset-picked field filled in).
        config = config or GenerationConfig()
        check_call(prompt, concepts, config)
        config = config.resolve(len(concepts))
        concept_tokens = self.concept_tokens(prompt, concepts)
        check_noise(config, len(concepts), self.unet.config.in_channels,
                    self.vae_scale_factor, latents, reference_noise)
        # 2. Decode, mask and letterbox the references.
        refs = self.prepare_references(concepts, config)
        with self._lock:
            # 3. Scheduler, grids, z_T, embeddings, token tables.
            call = prepare_call(self.components, prompt, refs, concept_tokens, config,
                                device=self.device, dtype=self.dtype, latents=latents,
                                reference_noise=reference_noise)
            # 4. The steps: the fast loop, or the plain reference loop.
            if config.fast_path and supports_fast_ddim(call.scheduler):
                out = self.fast_sampler.sample(call, self.vae, self.model_name, on_step,
                                               self.kv_cache, self.use_cuda_graphs,
                                               on_step_end)
            else:
                out = sample_reference(self.unet, self.vae, call, on_step, on_step_end)
        # 5. Decode.
        image = self.decode(out.latents)
        self._offload_models()
        return MagicFaceResult(
            image=image, semantic_maps=out.semantic_maps,
            latents=out.latents, concept_tokens=concept_tokens,
            rsa_steps=call.rsa_steps if refs else 0, masks=[r.mask for r in refs],
            cache_hits=out.cache_hits, cache_misses=out.cache_misses, config=config)

    @torch.no_grad()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (k, C, h, w) -> images (k, 3, H, W) in [0, 1], float32."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                            return_dict=False)[0]
        return (x / 2 + 0.5).clamp(0, 1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        arr = self.decode_tensor(latents).cpu().permute(0, 2, 3, 1).numpy()[0]
        return Image.fromarray((arr * 255).round().astype(np.uint8))

    # -- diffusers' calling convention ---------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        concepts: Sequence[Concept] = (),
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        reference_noise: torch.Tensor | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **config_fields: Any,
    ) -> MagicFacePipelineOutput | tuple:
        """Sample `num_images_per_prompt` images, diffusers-style.

        Other `GenerationConfig` fields (`alpha`, `preset`, `seed`, `ca_scale`, ...) are
        keywords too. `generator` (one, or one per image) draws each image's z_T the way
        diffusers does, and its `initial_seed()` seeds that image's reference-path noise
        (unless `reference_noise` is given); without a generator, image i uses seed
        `seed + i`. `latents` (k, C, h, w) gives z_T outright. The images are sampled
        one after another (the fast loop runs one target per UNet call).
        `callback_on_step_end(pipe, step, timestep, callback_kwargs)` runs after each
        step with the tensors named in `callback_on_step_end_tensor_inputs`
        ("latents"); a returned "latents" replaces the loop's.
        """
        from diffusers.utils.torch_utils import randn_tensor

        from .output import MagicFacePipelineOutput

        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - {"latents"}
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: unknown {sorted(unknown)}"
                             " (this pipeline offers: latents)")
        k = int(num_images_per_prompt)
        if k < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {k}")
        fields = {"steps": num_inference_steps, "guidance_scale": guidance_scale,
                  "negative_prompt": negative_prompt, **config_fields}
        if height is not None:
            fields["height"] = height
        if width is not None:
            fields["width"] = width
        known = {f.name for f in dataclasses.fields(GenerationConfig)}
        bad = sorted(set(fields) - known)
        if bad:
            raise TypeError(f"__call__() got unexpected keyword arguments: {', '.join(bad)}")
        base = GenerationConfig(**fields)
        generators = generator if isinstance(generator, list) else [generator] * k
        if len(generators) != k:
            raise ValueError(f"{len(generators)} generators for {k} images")
        if latents is not None and latents.shape[0] != k:
            raise ValueError(f"latents has {latents.shape[0]} rows for {k} images")
        shape = (1, self.unet.config.in_channels, base.height // self.vae_scale_factor,
                 base.width // self.vae_scale_factor)
        on_step_end = None
        if callback_on_step_end is not None:
            def on_step_end(i: int, t: torch.Tensor, lat: torch.Tensor):
                out = callback_on_step_end(self, i, t, {"latents": lat}) or {}
                return out.get("latents")
        results, bar = [], self.progress_bar(base.steps * k)
        try:
            for i in range(k):
                g, z = generators[i], None if latents is None else latents[i:i + 1]
                config = base.replace(seed=base.seed + i)
                if g is not None:
                    config = base.replace(seed=g.initial_seed() % 2**63)
                    if z is None:
                        z = randn_tensor(shape, generator=g, device=self.device,
                                         dtype=self.dtype)
                results.append(self.generate(
                    prompt, concepts, config, lambda *_: bar.update(1), latents=z,
                    reference_noise=reference_noise, on_step_end=on_step_end))
        finally:
            bar.close()
        final = torch.cat([r.latents for r in results])
        if output_type == "latent":
            images: Any = final
        else:
            pixels = self.decode_tensor(final)
            if output_type == "pt":
                images = pixels
            else:
                arr = pixels.cpu().permute(0, 2, 3, 1).numpy()
                images = arr if output_type == "np" else [
                    Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
        maps = [r.semantic_maps for r in results]
        if not return_dict:
            return images, maps
        return MagicFacePipelineOutput(images=images, semantic_maps=maps, results=results)


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
