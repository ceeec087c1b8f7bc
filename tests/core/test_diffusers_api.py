"""The pipeline the way a diffusers user calls it: from_pretrained's loading options,
`__call__` with generator, latents, output types, several images, return_dict and a
step-end callback that edits the latents; no concepts equals StableDiffusionPipeline;
arrays and tensors as concepts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_core import Concept, GenerationConfig, MagicFacePipeline
from magicface_core.output import MagicFacePipelineOutput

from ..helpers.examples import example_concepts

SMALL = {"num_inference_steps": 3, "height": 64, "width": 64}


@pytest.fixture
def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.set_progress_bar_config()


def test_a_diffusers_style_call(quiet, tmp_path):
    pipe = quiet
    prompt, concepts = example_concepts("trio", 1)
    seen = []

    def zero_at_step_1(p, step, timestep, kwargs):
        seen.append((step, int(timestep)))
        assert p is pipe and set(kwargs) == {"latents"}
        if step == 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    g = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    out = pipe(prompt, concepts, generator=g, output_type="latent", num_images_per_prompt=2,
               callback_on_step_end=zero_at_step_1, **SMALL)
    assert isinstance(out, MagicFacePipelineOutput)
    assert out.images.shape == (2, 4, 8, 8) and len(out.semantic_maps) == 2
    assert [s for s, _ in seen] == [0, 1, 2, 0, 1, 2]
    ts = [t for _, t in seen[:3]]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 3  # the DDIM timesteps
    plain = pipe(prompt, concepts, generator=[torch.Generator().manual_seed(5),
                                              torch.Generator().manual_seed(6)],
                 output_type="latent", num_images_per_prompt=2, **SMALL)
    assert not torch.allclose(out.images, plain.images)  # the edit took effect
    # The same generator seed, the same image; another seed, another image.
    again = pipe(prompt, concepts, generator=torch.Generator().manual_seed(5),
                 output_type="latent", **SMALL)
    torch.testing.assert_close(again.images[0], plain.images[0])
    assert not torch.allclose(plain.images[0], plain.images[1])
    # Explicit latents replace the generator's draw.
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = pipe(prompt, concepts, latents=z, output_type="latent", **SMALL).images
    b = pipe(prompt, concepts, latents=z, generator=torch.Generator().manual_seed(9),
             output_type="latent", **SMALL).images
    assert a.shape == (1, 4, 8, 8)
    assert not torch.allclose(a, b)  # the generator's seed drives the reference noise


def test_output_types_and_return_dict(quiet):
    prompt, concepts = example_concepts("trio", 1)
    pil = quiet(prompt, concepts, **SMALL).images
    assert isinstance(pil, list) and isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    arr = quiet(prompt, concepts, output_type="np", **SMALL).images
    assert arr.shape == (1, 64, 64, 3) and 0 <= arr.min() and arr.max() <= 1
    pt = quiet(prompt, concepts, output_type="pt", **SMALL).images
    assert pt.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    images, maps = quiet(prompt, concepts, return_dict=False, **SMALL)
    assert len(images) == 1 and len(maps[0]) == 3
    with pytest.raises(ValueError, match="output_type"):
        quiet(prompt, concepts, output_type="jpeg", **SMALL)
    with pytest.raises(TypeError, match="num_steps"):
        quiet(prompt, concepts, num_steps=3)
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
    sd = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                 unet=c.unet, scheduler=quiet.scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ours = quiet("a photo of a man", generator=torch.Generator().manual_seed(4),
                 output_type="latent", preset="paper", **SMALL).images
    theirs = sd("a photo of a man", generator=torch.Generator().manual_seed(4),
                output_type="latent", **SMALL).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_arrays_and_tensors_are_concepts(quiet):
    prompt, concepts = example_concepts("trio", 1)
    c = concepts[0]
    img = np.asarray(Image.open(c.image).convert("RGB"))
    mask = np.asarray(Image.open(c.mask).convert("L"))
    as_array = Concept(image=img, mask=mask, word=c.word, weight=c.weight)
    as_tensor = Concept(image=torch.from_numpy(img).permute(2, 0, 1).float() / 255,
                        mask=torch.from_numpy(mask > 127), word=c.word, weight=c.weight)
    as_pil = Concept(image=Image.fromarray(img), mask=Image.fromarray(mask), word=c.word,
                     weight=c.weight)
    outs = [quiet(prompt, [x], output_type="latent", **SMALL).images
            for x in (as_pil, as_array, as_tensor)]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    from magicface_core import MagicFaceInputError

    with pytest.raises(MagicFaceInputError, match="shape"):
        quiet(prompt, [Concept(image=np.zeros((2, 2, 2, 2), np.uint8), word=c.word)], **SMALL)


def test_from_pretrained_takes_diffusers_options(quiet, tmp_path):
    quiet.save_pretrained(tmp_path / "model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = MagicFacePipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.float32,
                                                   local_files_only=True,
                                                   use_safetensors=True)
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
    assert loaded.dtype == torch.float32
    assert MagicFacePipeline.from_pretrained(tmp_path / "model", dtype=torch.float32)
    with pytest.raises(TypeError, match="not both"):
        MagicFacePipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.float16,
                                          dtype=torch.float32)
    assert loaded.to("cpu") is loaded and loaded.to(torch.float32).dtype == torch.float32
    loaded.to("cpu", torch.float32)
    loaded.enable_vae_slicing()
    loaded.enable_vae_tiling()
    assert loaded.vae.use_slicing and loaded.vae.use_tiling
    loaded.disable_vae_slicing()
    loaded.disable_vae_tiling()
    assert not loaded.vae.use_slicing and not loaded.vae.use_tiling


def test_model_cpu_offload_hooks_leave_the_image_unchanged(tmp_path):
    """The offload's wiring, on the CPU (the GPU memory saving itself needs a GPU)."""
    pipe = MagicFacePipeline.tiny(seed=0)
    pipe.set_progress_bar_config(disable=True)
    prompt, concepts = example_concepts("trio", 1)
    before = pipe(prompt, concepts, output_type="latent", **SMALL).images
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(m, "_hf_hook") for m in (pipe.text_encoder, pipe.unet, pipe.vae))
    assert pipe.device == torch.device("cpu") and not pipe.use_cuda_graphs
    after = pipe(prompt, concepts, output_type="latent", **SMALL).images
    torch.testing.assert_close(before, after)
