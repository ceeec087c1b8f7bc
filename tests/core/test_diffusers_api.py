"""The pipeline the way a diffusers user calls it: from_pretrained's loading options,
`__call__` with generator, latents, output types, several images, return_dict and a
step-end callback that edits the latents (both loops); no concepts equals
StableDiffusionPipeline; arrays and tensors as concepts; to(), components, the VAE
switches, the progress bar and model offload."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_core import Concept, GenerationConfig, MagicFaceInputError, MagicFacePipeline
from magicface_core.output import MagicFacePipelineOutput

from ..helpers.examples import example_concepts
from ..helpers.pipeline import assert_latents_close

SMALL = {"num_inference_steps": 3, "height": 64, "width": 64}


@pytest.fixture
def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.set_progress_bar_config()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pipe):
    return pipe.save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


@contextmanager
def library_logs() -> Iterator[list[str]]:
    """What diffusers and transformers log (their loggers do not propagate to the root,
    so caplog misses them), with transformers' warn-once memory cleared."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield seen
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_a_diffusers_style_call(saved):
    with library_logs() as logged, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = MagicFacePipeline.from_pretrained(saved, torch_dtype=torch.float32,
                                                 local_files_only=True)
    assert not [m for m in logged + [str(w.message) for w in caught] if "dtype" in m]
    pipe.set_progress_bar_config(disable=True)
    prompt, concepts = example_concepts("trio", 1)
    seen, kept = [], []

    def zero_at_step_1(p, step, timestep, kwargs):
        seen.append((step, int(timestep)))
        assert p is pipe and set(kwargs) == {"latents"}
        kept.append(kwargs["latents"])
        if step == 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]

    out = pipe(prompt, concepts, generator=gens(), output_type="latent",
               num_images_per_prompt=2, callback_on_step_end=zero_at_step_1, **SMALL)
    assert isinstance(out, MagicFacePipelineOutput)
    assert out.images.shape == (2, 4, 8, 8) and len(out.semantic_maps) == 2
    # Every step of each image, with the DDIM timesteps the call ran; the images are
    # sampled together, so their callbacks come step by step.
    timesteps = pipe.make_scheduler(out.results[0].config)
    timesteps.set_timesteps(3)
    assert seen == [(s, int(t)) for s, t in enumerate(timesteps.timesteps) for _ in "ab"]
    # The fast loop hands over a copy of its static buffer: what the callback kept is
    # each step's latents, not the last step's seen three times.
    assert not torch.equal(kept[0], kept[2]) and torch.count_nonzero(kept[1]) > 0
    plain = pipe(prompt, concepts, generator=gens(), output_type="latent",
                 num_images_per_prompt=2, **SMALL)
    assert not torch.allclose(out.images, plain.images)  # the edit took effect
    # The generator's seed is the image's recorded seed (it drives the reference noise).
    assert [r.config.seed for r in plain.results] == [5, 6]
    # The same generator seed, the same image; another seed, another image.
    again = pipe(prompt, concepts, generator=torch.Generator().manual_seed(5),
                 output_type="latent", **SMALL)
    torch.testing.assert_close(again.images[0], plain.images[0])
    assert not torch.allclose(plain.images[0], plain.images[1])
    # Explicit latents replace the generator's draw (one row per image).
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = pipe(prompt, concepts, latents=z, output_type="latent", num_images_per_prompt=2,
             **SMALL).images
    b = pipe(prompt, concepts, latents=z[:1], generator=torch.Generator().manual_seed(9),
             output_type="latent", **SMALL).images
    assert a.shape == (2, 4, 8, 8) and b.shape == (1, 4, 8, 8)
    assert not torch.allclose(a[:1], b)  # the generator's seed drives the reference noise
    with pytest.raises(ValueError, match="one row per image"):
        pipe(prompt, concepts, latents=z, **SMALL)
    with pytest.raises(ValueError, match="generators for 3 images"):
        pipe(prompt, concepts, generator=gens(), num_images_per_prompt=3, **SMALL)


@pytest.mark.parametrize("fast_path", [True, False])
def test_the_callback_edits_both_loops_alike(quiet, fast_path):
    prompt, concepts = example_concepts("trio", 1)

    def returned(p, step, t, kw):
        return {"latents": kw["latents"] * 0.5} if step == 1 else None

    def in_place(p, step, t, kw):
        if step == 1:
            kw["latents"].mul_(0.5)
        return {}

    run = {"output_type": "latent", "fast_path": fast_path, **SMALL}
    plain = quiet(prompt, concepts, **run).images
    edited = quiet(prompt, concepts, callback_on_step_end=returned, **run).images
    assert not torch.allclose(plain, edited)
    torch.testing.assert_close(
        quiet(prompt, concepts, callback_on_step_end=in_place, **run).images, edited)
    # The fast loop's edit equals the plain loop's.
    other = quiet(prompt, concepts, callback_on_step_end=returned,
                  **{**run, "fast_path": not fast_path}).images
    assert_latents_close(edited, other)
    with pytest.raises(ValueError, match="shape"):
        quiet(prompt, concepts, callback_on_step_end=lambda *a: {"latents": torch.zeros(3)},
              **run)


def test_output_types_and_return_dict(quiet):
    prompt, concepts = example_concepts("trio", 1)
    pil = quiet(prompt, concepts, **SMALL).images
    assert isinstance(pil, list) and isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    arr = quiet(prompt, concepts, output_type="np", **SMALL).images
    assert arr.shape == (1, 64, 64, 3) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 1
    pt = quiet(prompt, concepts, output_type="pt", **SMALL).images
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    images, maps = quiet(prompt, concepts, return_dict=False, **SMALL)
    assert len(images) == 1 and len(maps[0]) == 3
    # Without a generator image i has seed `seed + i`.
    two = quiet(prompt, concepts, output_type="latent", num_images_per_prompt=2, seed=4,
                **SMALL)
    assert [r.config.seed for r in two.results] == [4, 5] and two.results[0].image is None
    torch.testing.assert_close(
        two.images[1:], quiet(prompt, concepts, output_type="latent", seed=5, **SMALL).images)
    # Without height and width: the model's native size, as diffusers (64 for tiny).
    assert quiet(prompt, concepts, num_inference_steps=2).images[0].size == (64, 64)
    with pytest.raises(ValueError, match="output_type"):
        quiet(prompt, concepts, output_type="jpeg", **SMALL)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_steps'"):
        quiet(prompt, concepts, num_steps=3)
    with pytest.raises(TypeError, match="num_inference_steps"):
        quiet(prompt, concepts, steps=3)
    with pytest.raises(ValueError, match="noise_pred"):
        quiet(prompt, concepts, callback_on_step_end=lambda *a: {},
              callback_on_step_end_tensor_inputs=["latents", "noise_pred"], **SMALL)


def test_call_equals_generate_with_the_same_config(quiet):
    prompt, concepts = example_concepts("trio", 2)
    out = quiet(prompt, concepts, alpha=0.5, seed=3, output_type="latent", **SMALL)
    res = quiet.generate(prompt, concepts, GenerationConfig(steps=3, height=64, width=64,
                                                            alpha=0.5, seed=3))
    torch.testing.assert_close(out.images[0:1], res.latents)
    assert out.results[0].config == res.config


def test_no_concepts_matches_stable_diffusion_pipeline(quiet):
    from diffusers import StableDiffusionPipeline

    c = quiet.components
    assert set(c) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert c["unet"] is quiet.unet and dict(c)["vae"] is quiet.vae
    sd = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    call = {"negative_prompt": "a hat", "num_images_per_prompt": 2, **SMALL}
    ours = quiet("a photo of a man", generator=torch.Generator().manual_seed(4),
                 output_type="np", preset="paper", **call).images
    theirs = sd("a photo of a man", generator=torch.Generator().manual_seed(4),
                output_type="np", **call).images
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = quiet("a photo of a man", latents=z, output_type="latent", preset="paper",
                 **SMALL).images
    theirs = sd("a photo of a man", latents=z, output_type="latent", **SMALL).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_arrays_and_tensors_are_concepts(quiet):
    prompt, concepts = example_concepts("trio", 1)
    c = concepts[0]
    img = np.array(Image.open(c.image).convert("RGB"))
    mask = np.array(Image.open(c.mask).convert("L"))

    def concept(image, m=mask) -> Concept:
        return Concept(image=image, mask=m, word=c.word, weight=c.weight)

    chw = torch.from_numpy(img).permute(2, 0, 1)
    forms = [
        concept(Image.fromarray(img), Image.fromarray(mask)),  # PIL, the reference
        concept(img),  # HxWx3 uint8, HxW uint8
        concept(img / 255.0, mask > 127),  # float in [0, 1], bool mask
        concept(chw.float() / 255, torch.from_numpy(mask > 127)),  # 3xHxW float tensor
        concept(torch.from_numpy(img), torch.from_numpy(mask)),  # HxWx3 uint8 tensor
        concept(chw[None].float() / 255),  # diffusers' (1, 3, H, W)
    ]
    outs = [quiet(prompt, [x], output_type="latent", **SMALL).images for x in forms]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0])
    bad = [(np.zeros((2, 2, 2, 2), np.uint8), "shape"), (img * 2.0, r"\[0, 1\]"),
           (img.astype(np.int64), "uint8"), (3.5, "got float")]
    for image, problem in bad:
        with pytest.raises(MagicFaceInputError, match=rf"concepts\[0\] \('{c.word}'\).*"
                                                      f"{problem}"):
            quiet(prompt, [concept(image)], **SMALL)


def test_from_pretrained_takes_diffusers_options(quiet, saved):
    with library_logs() as logged, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = MagicFacePipeline.from_pretrained(saved, torch_dtype=torch.float32,
                                                   local_files_only=True,
                                                   use_safetensors=True, variant=None)
    assert not [m for m in logged + [str(w.message) for w in caught] if "torch_dtype" in m]
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    half = MagicFacePipeline.from_pretrained(saved, dtype=torch.float16)
    assert half.dtype == half.vae.dtype == half.text_encoder.dtype == torch.float16
    with pytest.raises(TypeError, match="not both"):
        MagicFacePipeline.from_pretrained(saved, torch_dtype=torch.float16, dtype=torch.float32)
    # diffusers' habits: a component by name replaces its loading; no safety checker.
    own = MagicFacePipeline.from_pretrained(saved, scheduler=quiet.scheduler,
                                            safety_checker=None, requires_safety_checker=False)
    assert own.scheduler is quiet.scheduler
    with pytest.raises(TypeError, match="safety_checker"):
        MagicFacePipeline.from_pretrained(saved, safety_checker=object())
    # to(): positional device and/or dtype, or keywords.
    assert loaded.to("cpu") is loaded and loaded.to(torch.float16).dtype == torch.float16
    assert loaded.to("cpu", torch.float32).dtype == torch.float32
    assert loaded.to(torch_dtype=torch.float16).vae.dtype == torch.float16
    assert loaded.to(device=torch.device("cpu"), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(TypeError):
        loaded.to(3)
    # The VAE's own switches; slicing decodes a batch to the same pixels.
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = loaded.decode_tensor(z)
    loaded.enable_vae_slicing()
    loaded.enable_vae_tiling()
    assert loaded.vae.use_slicing and loaded.vae.use_tiling
    torch.testing.assert_close(loaded.decode_tensor(z), batch)
    loaded.disable_vae_slicing()
    loaded.disable_vae_tiling()
    assert not loaded.vae.use_slicing and not loaded.vae.use_tiling


def test_progress_bar_in_call_only(quiet, capsys):
    prompt, concepts = example_concepts("trio", 1)
    out = io.StringIO()
    quiet.set_progress_bar_config(file=out, desc="sampling")
    quiet(prompt, concepts, output_type="latent", num_images_per_prompt=2, **SMALL)
    assert "sampling" in out.getvalue() and "6/6" in out.getvalue()
    quiet.set_progress_bar_config(disable=True)
    quiet(prompt, concepts, output_type="latent", **SMALL)
    quiet.set_progress_bar_config()
    capsys.readouterr()
    quiet.generate(prompt, concepts, GenerationConfig(steps=2, height=64, width=64))
    assert capsys.readouterr().err == ""


def test_model_cpu_offload_hooks_leave_the_image_unchanged():
    """The offload's wiring, on the CPU (the GPU memory saving itself needs a GPU)."""
    pipe = MagicFacePipeline.tiny(seed=0)
    pipe.set_progress_bar_config(disable=True)
    prompt, concepts = example_concepts("trio", 1)
    before = pipe(prompt, concepts, output_type="latent", **SMALL).images
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            pipe.enable_model_cpu_offload()
    with pytest.raises(ValueError, match="not both"):
        pipe.enable_model_cpu_offload(gpu_id=0, device="cuda:1")
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.enable_model_cpu_offload(device="cpu")  # again: the hooks replaced, not stacked
    assert all(hasattr(m, "_hf_hook") for m in (pipe.text_encoder, pipe.unet, pipe.vae))
    assert pipe.device == torch.device("cpu") and not pipe.use_cuda_graphs
    after = pipe(prompt, concepts, output_type="latent", **SMALL).images
    torch.testing.assert_close(before, after)
    pipe.remove_all_hooks()
    assert not any(hasattr(m, "_hf_hook") for m in (pipe.text_encoder, pipe.unet, pipe.vae))
    assert pipe.use_cuda_graphs
