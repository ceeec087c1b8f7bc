"""MagicFacePipeline: loading, the fast-loop switches, `generate` (validate, prepare
the call, run a loop, decode) and the diffusers-style `__call__` built on it."""

from __future__ import annotations

import hashlib
import logging
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
from .sampling.fast import batch_key
from .sampling.prepare import PreparedCall
from .sampling.steps import SampleOutput, StepEndCallback
from .tokens import word_token_indices

__all__ = ["MagicFacePipeline", "MagicFaceResult", "GenerationRequest", "load_pipeline"]

StepCallback = Callable[[int, int], None]

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class MagicFaceResult:
    # None only in `__call__(output_type="latent")`'s results (nothing decoded).
    image: Image.Image | None
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


@dataclass
class GenerationRequest:
    """One image to make, as `generate` takes it: for `generate_batch`."""

    prompt: str
    concepts: Sequence[Concept] = ()
    config: GenerationConfig | None = None
    on_step: StepCallback | None = None
    latents: torch.Tensor | None = None
    reference_noise: torch.Tensor | None = None
    on_step_end: StepEndCallback | None = None


@dataclass
class _Prepared:
    call: PreparedCall
    fast: bool  # runs on the fast loop

    def result(self, out: SampleOutput) -> MagicFaceResult:
        call = self.call
        return MagicFaceResult(
            image=None, semantic_maps=out.semantic_maps, latents=out.latents,
            concept_tokens=call.concept_tokens, rsa_steps=call.rsa_steps if call.n else 0,
            masks=[r.mask for r in call.refs], cache_hits=out.cache_hits,
            cache_misses=out.cache_misses, config=call.config)


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class _Offload:
    """enable_model_cpu_offload's state: where the models run, accelerate's hooks in
    the offload order, and the CUDA-graph switch to restore when it is removed."""

    device: torch.device
    hooks: list
    use_cuda_graphs: bool


class MagicFacePipeline:
    """Training-free customization of SD1.x / SD2.x with one reference per concept.

    One `generate` at a time per pipeline (calls are serialised by a lock): the
    attention processors are installed for the duration of a call.
    """

    # diffusers' class attributes: the model offload order, and the tensors a
    # callback_on_step_end may ask for.
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ("latents",)

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
        self._offload: _Offload | None = None  # see enable_model_cpu_offload
        self._progress_bar_config: dict[str, Any] = {}

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

    # -- diffusers' memory switches ----------------------------------------------------
    def enable_model_cpu_offload(self, gpu_id: int | None = None,
                                 device: str | torch.device = "cuda") -> None:
        """Keep each model on the CPU until it runs (diffusers' model offload, through
        accelerate's hooks): text encoder, then UNet, then VAE on `device`, one at a
        time (`model_cpu_offload_seq`), and all back on the CPU after each call. Saves
        GPU memory at some speed; CUDA graphs are off while it is on (the weights move
        between calls, so a captured graph would read freed memory). Calling it again
        replaces the hooks; `remove_all_hooks()` undoes it."""
        from accelerate import cpu_offload_with_hook

        device = torch.device(device)
        if gpu_id is not None and device.index is not None:
            raise ValueError(f"give gpu_id ({gpu_id}) or a device index ({device}), not both")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("enable_model_cpu_offload needs a CUDA device (none is "
                                   "available); pass device='cpu' to test the hooks alone")
            device = torch.device("cuda", gpu_id if gpu_id is not None else device.index or 0)
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
        self._offload = _Offload(device, hooks, graphs)
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

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for `__call__`'s progress bar over the sampling steps
        (`disable=True` silences it; `desc=`, `leave=`, `file=`, ...). `generate` has
        no bar: it reports through `on_step`."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
        """A tqdm bar with the options of `set_progress_bar_config`, as diffusers'."""
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, **self._progress_bar_config)

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
        out = self.generate_batch([GenerationRequest(
            prompt, concepts, config, on_step, latents=latents,
            reference_noise=reference_noise, on_step_end=on_step_end)], max_batch=1)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def _prepare(self, r: GenerationRequest) -> _Prepared:
        """A request checked, resolved and prepared for a loop (the caller holds the
        lock: prepare_call runs the text encoder)."""
        # 1. Check and resolve the inputs (every preset-picked field filled in).
        config = r.config or GenerationConfig()
        check_call(r.prompt, r.concepts, config)
        config = config.resolve(len(r.concepts))
        concept_tokens = self.concept_tokens(r.prompt, r.concepts)
        check_noise(config, len(r.concepts), self.unet.config.in_channels,
                    self.vae_scale_factor, r.latents, r.reference_noise)
        # 2. Decode, mask and letterbox the references.
        refs = self.prepare_references(r.concepts, config)
        # 3. Scheduler, grids, z_T, embeddings, token tables.
        call = prepare_call(self.components, r.prompt, refs, concept_tokens, config,
                            device=self.device, dtype=self.dtype, latents=r.latents,
                            reference_noise=r.reference_noise)
        return _Prepared(call, config.fast_path and supports_fast_ddim(call.scheduler))

    def generate_batch(self, requests: Sequence[GenerationRequest],
                       max_batch: int = 8) -> list[MagicFaceResult | Exception]:
        """Several requests, as a server batches them: each request's result is what
        `generate` gives for it (to float tolerance), or the exception it raised (bad
        input, or one from its own callback: a cancel) without disturbing the others.

        Requests that share a call shape (`batch_key`: size, steps, concept count,
        preset options; prompts, seeds, guidance scales, references and weights may
        differ) run on the fast loop together, up to `max_batch` per UNet batch, and a
        reference several of them share is computed once. If a batch runs out of GPU
        memory, its requests run one by one.
        """
        try:
            results = self._sample_many(requests, max_batch)
            for out in results:
                if isinstance(out, MagicFaceResult):
                    out.image = self.decode(out.latents)
        finally:
            self.maybe_free_model_hooks()
        return results

    def _sample_many(self, requests: Sequence[GenerationRequest],
                     max_batch: int) -> list[MagicFaceResult | Exception]:
        """`generate_batch` up to the final latents (nothing decoded)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        results: list[MagicFaceResult | Exception | None] = [None] * len(requests)
        with self._lock:
            groups: dict[tuple, list[tuple[int, _Prepared]]] = {}
            for idx, r in enumerate(requests):
                try:
                    job = self._prepare(r)
                except Exception as e:  # noqa: BLE001 - that request's result
                    results[idx] = e
                    continue
                key = batch_key(job.call) if job.fast else ("reference loop", idx)
                groups.setdefault(key, []).append((idx, job))
            for members in groups.values():
                for start in range(0, len(members), max_batch):
                    chunk = members[start : start + max_batch]
                    for idx, out in self._run_chunk(chunk, requests):
                        results[idx] = out
        return results  # type: ignore[return-value]

    def _run_chunk(self, chunk: list[tuple[int, _Prepared]],
                   requests: Sequence[GenerationRequest]):
        """(request index, result or exception) for requests sampled together; a
        batch that runs out of GPU memory is run again one request at a time."""
        r = [requests[idx] for idx, _ in chunk]
        jobs = [job for _, job in chunk]
        try:
            if not jobs[0].fast:
                (idx, job), = chunk
                out = sample_reference(self.unet, self.vae, job.call, r[0].on_step,
                                       r[0].on_step_end)
                return [(idx, job.result(out))]
            outs = self.fast_sampler.sample_batch(
                [j.call for j in jobs], self.vae, self.model_name, [x.on_step for x in r],
                self.kv_cache, self.use_cuda_graphs, [x.on_step_end for x in r])
        except torch.cuda.OutOfMemoryError as e:
            if len(chunk) == 1:
                return [(chunk[0][0], e)]
            torch.cuda.empty_cache()
            log.warning("a batch of %d ran out of GPU memory; running it one by one",
                        len(chunk))
            return [pair for one in chunk for pair in self._run_chunk([one], requests)]
        except Exception as e:  # noqa: BLE001 - a failure of the batch is each one's
            return [(idx, e) for idx, _ in chunk]
        return [(idx, out if isinstance(out, Exception) else job.result(out))
                for (idx, job), out in zip(chunk, outs, strict=True)]

    @torch.no_grad()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (k, C, h, w) -> images (k, 3, H, W) in [0, 1], float32."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                            return_dict=False)[0]
        return (x / 2 + 0.5).clamp(0, 1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        return _to_pil(self.decode_tensor(latents).cpu().permute(0, 2, 3, 1).numpy())[0]

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
        alpha: float = 0.4,
        preset: str = "authors",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        reference_noise: torch.Tensor | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **config_fields: Any,
    ) -> MagicFacePipelineOutput | tuple[Any, list[list[torch.Tensor]]]:
        """Sample `num_images_per_prompt` images of `prompt` with `concepts`,
        diffusers-style.

        The keywords build a `GenerationConfig` (`num_inference_steps` is its `steps`);
        its other fields (`seed`, `ca_scale`, `fast_path`, ...) are keywords too, and an
        unknown keyword is a TypeError. `height` and `width` default to the model's
        native size (UNet sample size x VAE scale factor), as in diffusers. `preset`
        defaults to "authors" (the authors' code); "paper" with no concepts is exactly
        `StableDiffusionPipeline`.

        Noise: `generator` (one, or a list with one per image) draws z_T as diffusers
        draws it (`randn_tensor((k, C, h, w), generator)`); the seed recorded in each
        image's config, which also seeds its reference-path noise unless
        `reference_noise` is given, is then that generator's `initial_seed()` (a single
        generator gives every image the same reference noise). Without a generator
        image i is seeded by `seed + i`. `latents` (k, C, h, w) gives z_T outright.
        `reference_noise` (steps, N, C, h, w) serves every image.

        The images are sampled together (`generate_batch`: one UNet batch per step,
        the references computed once), each equal to its `generate` image, then decoded
        in one VAE batch. `output_type`: "pil" (a list of PIL images), "np" ((k, H, W, 3)
        float32 in [0, 1]), "pt" ((k, 3, H, W) float32 in [0, 1]) or "latent" (the final
        latents (k, C, h, w), not decoded).

        `callback_on_step_end(pipe, step, timestep, callback_kwargs)` runs after each
        step of each image (step counts from 0 for each image; the images are sampled
        together, so the calls come step by step, image after image) with the tensors named
        in `callback_on_step_end_tensor_inputs` ("latents": the target latents after
        the step; the tensor is the callback's to keep); a returned `{"latents": x}`,
        or the tensor edited in place, replaces the loop's latents. A diffusers
        `PipelineCallback` brings its own `tensor_inputs`.

        Returns `MagicFacePipelineOutput(images, semantic_maps, results)` (`results`:
        each image's MagicFaceResult, with `image` None for "latent"), or with
        `return_dict=False` the tuple `(images, semantic_maps)`.
        """
        from diffusers.utils.torch_utils import randn_tensor

        # 1. Check the call's own arguments before any work.
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got "
                             f"{output_type!r}")
        tensor_inputs = tuple(getattr(callback_on_step_end, "tensor_inputs", None)
                              or callback_on_step_end_tensor_inputs)
        unknown = [n for n in tensor_inputs if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not offered "
                             f"(this pipeline offers {list(self._callback_tensor_inputs)})")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt,
                                                                     int):
            raise TypeError("num_images_per_prompt must be an int")
        k = num_images_per_prompt
        if k < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {k}")
        base = self._call_config(num_inference_steps, guidance_scale, negative_prompt,
                                 height, width, alpha, preset, config_fields)
        if isinstance(generator, (list, tuple)) and len(generator) != k:
            raise ValueError(f"{len(generator)} generators for {k} images "
                             "(num_images_per_prompt): give one per image, or one")
        shape = (k, self.unet.config.in_channels, base.height // self.vae_scale_factor,
                 base.width // self.vae_scale_factor)
        if latents is not None and (latents.ndim != 4 or latents.shape[0] != k):
            raise ValueError(f"latents must have shape {shape} (one row per image), got "
                             f"{tuple(latents.shape)}")
        # 2. z_T: given, or the generator's draw, exactly as diffusers' prepare_latents.
        if latents is None and generator is not None:
            latents = randn_tensor(shape, generator=list(generator) if isinstance(
                generator, tuple) else generator, device=self.device, dtype=self.dtype)
        on_step_end = (None if callback_on_step_end is None
                       else self._step_end(callback_on_step_end, tensor_inputs))
        # 3. The images, sampled together (one UNet batch per step), then one decode.
        bar = self.progress_bar(total=base.steps * k)
        try:
            results = self._sample_many([GenerationRequest(
                prompt, concepts, self._image_config(base, generator, i),
                lambda *_: bar.update(1),
                latents=None if latents is None else latents[i:i + 1],
                reference_noise=reference_noise, on_step_end=on_step_end)
                for i in range(k)], max_batch=k)
            for r in results:
                if isinstance(r, Exception):
                    raise r
            final = torch.cat([r.latents for r in results])
            images = final if output_type == "latent" else self._postprocess(
                self.decode_tensor(final), output_type, results)
        finally:
            bar.close()
            self.maybe_free_model_hooks()
        maps = [r.semantic_maps for r in results]
        if not return_dict:
            return images, maps
        return MagicFacePipelineOutput(images=images, semantic_maps=maps, results=results)

    def _call_config(self, steps: int, guidance_scale: float, negative_prompt: str | None,
                     height: int | None, width: int | None, alpha: float, preset: str,
                     config_fields: dict[str, Any]) -> GenerationConfig:
        """`__call__`'s keywords as a GenerationConfig; unknown ones refused as Python
        refuses them."""
        if "steps" in config_fields:
            # The config's name for num_inference_steps: both would be ambiguous.
            raise TypeError("__call__() got an unexpected keyword argument 'steps' (the "
                            "number of steps is num_inference_steps)")
        bad = [k for k in config_fields if k not in GenerationConfig.field_names()]
        if bad:
            plural = "s" if len(bad) > 1 else ""
            raise TypeError(f"__call__() got an unexpected keyword argument{plural} "
                            + ", ".join(repr(k) for k in bad))
        default_h, default_w = self._default_size()
        return GenerationConfig(
            steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            height=default_h if height is None else height,
            width=default_w if width is None else width, alpha=alpha, preset=preset,
            **config_fields)

    def _default_size(self) -> tuple[int, int]:
        """diffusers' default image size: the UNet's sample size in pixels."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @staticmethod
    def _image_config(base: GenerationConfig, generator: Any, i: int) -> GenerationConfig:
        """Image i's config: its seed is its generator's, else `seed + i`."""
        if generator is None:
            return base.replace(seed=(base.seed + i) % 2**63)
        g = generator[i] if isinstance(generator, (list, tuple)) else generator
        # initial_seed() is a 64-bit unsigned value; the config holds 63 bits.
        return base.replace(seed=g.initial_seed() % 2**63)

    def _step_end(self, callback: Callable[..., Any],
                  tensor_inputs: tuple[str, ...]) -> StepEndCallback:
        """diffusers' callback_on_step_end as the loops' on_step_end."""

        def on_step_end(i: int, t: torch.Tensor, lat: torch.Tensor) -> torch.Tensor | None:
            out = callback(self, i, t, {name: lat for name in tensor_inputs})
            new = out.get("latents") if isinstance(out, dict) else None
            if new is not None and (not isinstance(new, torch.Tensor)
                                    or new.shape != lat.shape):
                raise ValueError("callback_on_step_end returned latents of shape "
                                 f"{tuple(getattr(new, 'shape', ()))}, expected "
                                 f"{tuple(lat.shape)}")
            return new

        return on_step_end

    @staticmethod
    def _postprocess(pixels: torch.Tensor, output_type: str,
                     results: list[MagicFaceResult]) -> Any:
        """Decoded pixels (k, 3, H, W) in [0, 1] as `output_type`; each result's
        `image` set to its PIL image (as `generate` sets it)."""
        arr = pixels.cpu().permute(0, 2, 3, 1).numpy()
        pil = _to_pil(arr)
        for r, img in zip(results, pil, strict=True):
            r.image = img
        return {"pil": pil, "np": arr, "pt": pixels}[output_type]


def _to_pil(arr: np.ndarray) -> list[Image.Image]:
    """(k, H, W, 3) floats in [0, 1] -> k PIL images, rounded as diffusers'
    `numpy_to_pil` rounds."""
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


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
