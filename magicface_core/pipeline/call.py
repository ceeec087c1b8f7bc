"""diffusers' calling convention: `pipe(prompt, concepts, ...)`, its progress bar, and
the steps `__call__` is made of, built on the batching that `generate_batch` uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import Concept, GenerationConfig
from ..output import MagicFacePipelineOutput
from ..sampling.steps import StepEndCallback
from .results import OUTPUT_TYPES, GenerationRequest, MagicFaceResult, to_pil


class CallMixin:
    """`MagicFacePipeline.__call__` and its progress bar."""

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for `__call__`'s progress bar over the sampling steps
        (`disable=True` silences it; `desc=`, `leave=`, `file=`, ...). `generate` has
        no bar: it reports through `on_step`."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
        """A tqdm bar with the options of `set_progress_bar_config`, as diffusers'."""
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, **self._progress_bar_config)

    @torch.no_grad()
    def __call__(
        self, prompt: str, concepts: Sequence[Concept] = (), *, num_inference_steps: int = 50,
        guidance_scale: float = 7.5, negative_prompt: str | None = None, height: int | None = None,
        width: int | None = None, alpha: float = 0.4, preset: str = "authors",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None, reference_noise: torch.Tensor | None = None,
        output_type: str = "pil", num_images_per_prompt: int = 1, return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), **config_fields: Any,
    ) -> MagicFacePipelineOutput | tuple[Any, list[list[torch.Tensor]]]:
        """Sample `num_images_per_prompt` images of `prompt` with `concepts`, diffusers-style.

        The keywords build a `GenerationConfig` (`num_inference_steps` is its `steps`); its
        other fields (`seed`, `ca_scale`, `fast_path`, ...) are keywords too, and an unknown
        keyword is a TypeError. `height` and `width` default to the model's native size (UNet
        sample size x VAE scale factor), as in diffusers. `preset` defaults to "authors" (the
        authors' code); "paper" with no concepts is exactly `StableDiffusionPipeline`.

        Noise: `generator` (one, or a list with one per image) draws z_T as diffusers draws it
        (`randn_tensor((k, C, h, w), generator)`); the seed recorded in each image's config,
        which also seeds its reference-path noise unless `reference_noise` is given, is then
        that generator's `initial_seed()` (a single generator gives every image the same
        reference noise). Without a generator image i is seeded by `seed + i`. `latents`
        (k, C, h, w) gives z_T outright. `reference_noise` (steps, N, C, h, w) serves every image.

        The images are sampled together (`generate_batch`: one UNet batch per step, the
        references computed once), each equal to its `generate` image, then decoded in one VAE
        batch. `output_type`: "pil" (a list of PIL images), "np" ((k, H, W, 3) float32 in
        [0, 1]), "pt" ((k, 3, H, W) float32 in [0, 1]) or "latent" (the final latents
        (k, C, h, w), not decoded).

        `callback_on_step_end(pipe, step, timestep, callback_kwargs)` runs after each step of
        each image (step counts from 0 for each image; the images are sampled together, so the
        calls come step by step, image after image) with the tensors named in
        `callback_on_step_end_tensor_inputs` ("latents": the target latents after the step; the
        tensor is the callback's to keep); a returned `{"latents": x}`, or the tensor edited in
        place, replaces the loop's latents. A diffusers `PipelineCallback` brings its own
        `tensor_inputs`.

        Returns `MagicFacePipelineOutput(images, semantic_maps, results)` (`results`: each
        image's MagicFaceResult, with `image` None for "latent"), or with `return_dict=False`
        the tuple `(images, semantic_maps)`.
        """
        # 1. Check inputs: the call's own arguments, before any work.
        tensor_inputs = self._check_inputs(output_type, num_images_per_prompt,
                                           callback_on_step_end, callback_on_step_end_tensor_inputs)
        # 2. Define the call parameters: the config every image shares.
        base = self._call_config(num_inference_steps, guidance_scale, negative_prompt,
                                 height, width, alpha, preset, config_fields)
        # 3. Prepare latents: each image's z_T, given or drawn as diffusers' prepare_latents.
        rows = self._prepare_latents(base, num_images_per_prompt, generator, latents)
        # 4. One request per image: its seed, its z_T.
        requests = self._image_requests(prompt, concepts, base, generator, rows, reference_noise,
                                        self._step_end(callback_on_step_end, tensor_inputs))
        # 5. Denoise the images together (one UNet batch per step), decode in one batch.
        images, results = self._sample_and_decode(requests, output_type)
        maps = [r.semantic_maps for r in results]
        if not return_dict:
            return images, maps
        return MagicFacePipelineOutput(images=images, semantic_maps=maps, results=results)

    def _check_inputs(self, output_type: str, num_images_per_prompt: int,
                      callback: Callable[..., Any] | None,
                      tensor_inputs: Sequence[str]) -> tuple[str, ...]:
        """Step 1 of `__call__`: its own arguments checked. Returns the names of the
        tensors the step-end callback is given (a diffusers `PipelineCallback` brings its
        own)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got "
                             f"{output_type!r}")
        names = tuple(getattr(callback, "tensor_inputs", None) or tensor_inputs)
        unknown = [n for n in names if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not offered "
                             f"(this pipeline offers {list(self._callback_tensor_inputs)})")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt,
                                                                     int):
            raise TypeError("num_images_per_prompt must be an int")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        return names

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

    def _prepare_latents(self, base: GenerationConfig, k: int, generator: Any,
                         latents: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Step 3 of `__call__`: each image's z_T (1, C, h, w), None where its seed draws
        it. A generator draws all k rows in one `randn_tensor`, as diffusers'
        `prepare_latents` does, so the same generator gives the same z_T."""
        from diffusers.utils.torch_utils import randn_tensor

        if isinstance(generator, (list, tuple)) and len(generator) != k:
            raise ValueError(f"{len(generator)} generators for {k} images "
                             "(num_images_per_prompt): give one per image, or one")
        shape = (k, self.unet.config.in_channels, base.height // self.vae_scale_factor,
                 base.width // self.vae_scale_factor)
        if latents is not None and (latents.ndim != 4 or latents.shape[0] != k):
            raise ValueError(f"latents must have shape {shape} (one row per image), got "
                             f"{tuple(latents.shape)}")
        if latents is None and generator is not None:
            latents = randn_tensor(shape, generator=list(generator) if isinstance(
                generator, tuple) else generator, device=self.device, dtype=self.dtype)
        return [None] * k if latents is None else [latents[i:i + 1] for i in range(k)]

    def _image_requests(self, prompt: str, concepts: Sequence[Concept],
                        base: GenerationConfig, generator: Any,
                        rows: list[torch.Tensor | None], reference_noise: torch.Tensor | None,
                        on_step_end: StepEndCallback | None) -> list[GenerationRequest]:
        """Step 4 of `__call__`: one request per row of z_T, seeded as `_image_config`."""
        return [GenerationRequest(prompt, concepts, self._image_config(base, generator, i),
                                  latents=row, reference_noise=reference_noise,
                                  on_step_end=on_step_end)
                for i, row in enumerate(rows)]

    @staticmethod
    def _image_config(base: GenerationConfig, generator: Any, i: int) -> GenerationConfig:
        """Image i's config: its seed is its generator's, else `seed + i`."""
        if generator is None:
            return base.replace(seed=(base.seed + i) % 2**63)
        g = generator[i] if isinstance(generator, (list, tuple)) else generator
        # initial_seed() is a 64-bit unsigned value; the config holds 63 bits.
        return base.replace(seed=g.initial_seed() % 2**63)

    def _step_end(self, callback: Callable[..., Any] | None,
                  tensor_inputs: tuple[str, ...]) -> StepEndCallback | None:
        """diffusers' callback_on_step_end as the loops' on_step_end (None: none)."""
        if callback is None:
            return None

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

    def _sample_and_decode(self, requests: list[GenerationRequest],
                           output_type: str) -> tuple[Any, list[MagicFaceResult]]:
        """Step 5 of `__call__`: the requests sampled together under one progress bar
        over every image's steps, the first failure raised, the final latents decoded in
        one VAE batch (not for "latent"). The models go back to the CPU under offload,
        whatever happens."""
        bar = self.progress_bar(total=sum(r.config.steps for r in requests))
        try:
            results = self._sample_many(
                [dataclasses.replace(r, on_step=lambda *_: bar.update(1)) for r in requests],
                max_batch=len(requests))
            for r in results:
                if isinstance(r, Exception):
                    raise r
            final = torch.cat([r.latents for r in results])
            images = final if output_type == "latent" else self._postprocess(
                self.decode_tensor(final), output_type, results)
        finally:
            bar.close()
            self.maybe_free_model_hooks()
        return images, results

    @staticmethod
    def _postprocess(pixels: torch.Tensor, output_type: str,
                     results: list[MagicFaceResult]) -> Any:
        """Decoded pixels (k, 3, H, W) in [0, 1] as `output_type`; each result's
        `image` set to its PIL image (as `generate` sets it)."""
        arr = pixels.cpu().permute(0, 2, 3, 1).numpy()
        pil = to_pil(arr)
        for r, img in zip(results, pil, strict=True):
            r.image = img
        return {"pil": pil, "np": arr, "pt": pixels}[output_type]
