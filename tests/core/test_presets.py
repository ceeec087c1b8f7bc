"""Presets "authors" and "paper": what each picks, overrides, the DDIM schedules,
plain text-to-image under both, and explicit noise (latents=, reference_noise=)."""

from __future__ import annotations

import pytest
import torch

from magicface_core import GenerationConfig, MagicFacePipeline
from magicface_core.config import AUTHORS_NEGATIVE_PROMPT
from magicface_core.reference import reference_noise

from ..helpers.examples import example_concepts
from ..helpers.images import mask_image, noise_image
from .test_pipeline import sd_pipeline

PRESET_FIELDS = ("negative_prompt", "ca_scale", "foreground_mask", "region_guidance",
                 "map_refinement", "map_aggregation", "map_tokens", "rba_start",
                 "ddim_schedule")


def test_authors_is_the_default_and_resolves_to_the_authors_code():
    cfg = GenerationConfig()
    assert cfg.preset == "authors"
    one, many = cfg.resolve(1), cfg.resolve(3)
    assert one.negative_prompt == AUTHORS_NEGATIVE_PROMPT
    # Their configs: ca_scale 0.9 for one concept, 0.6 for several; below 0.9 their
    # get_mask keeps concept regions in the foreground.
    assert (one.ca_scale, one.foreground_mask) == (0.9, False)
    assert (many.ca_scale, many.foreground_mask) == (0.6, True)
    assert (one.region_guidance, one.map_refinement, one.map_aggregation, one.map_tokens,
            one.rba_start, one.ddim_schedule) == (True, "s+3s2", "smooth_meannorm", "all",
                                                  "after_floor", "authors")
    assert all(getattr(one, f) is not None for f in PRESET_FIELDS)


def test_paper_resolves_to_the_equations():
    p = GenerationConfig(preset="paper").resolve(2)
    assert (p.negative_prompt, p.ca_scale, p.foreground_mask, p.region_guidance) == (
        "", 1.0, False, False)
    assert (p.map_refinement, p.map_aggregation, p.map_tokens, p.rba_start,
            p.ddim_schedule) == ("s", "mean", "prompt", "round", "checkpoint")


def test_every_field_a_preset_picks_can_be_overridden():
    overrides = {"negative_prompt": "blurry", "ca_scale": 0.7, "foreground_mask": False,
                 "region_guidance": False, "map_refinement": "s", "map_aggregation": "mean",
                 "map_tokens": "prompt", "rba_start": "round", "ddim_schedule": "checkpoint"}
    assert set(overrides) == set(PRESET_FIELDS)
    got = GenerationConfig(**overrides).resolve(2)
    assert {f: getattr(got, f) for f in PRESET_FIELDS} == overrides
    # ca_scale below 0.9 switches the foreground mask on under "authors" unless set.
    assert GenerationConfig(ca_scale=0.5).resolve(1).foreground_mask is True
    assert GenerationConfig(ca_scale=0.95).resolve(3).foreground_mask is False


@pytest.mark.parametrize("field,value", [("preset", "paperz"), ("map_refinement", "s2"),
                                         ("map_aggregation", "max"), ("map_tokens", "some"),
                                         ("rba_start", "late"), ("ddim_schedule", "ddpm"),
                                         ("foreground_mask", "yes"), ("ca_scale", 0.0),
                                         ("region_guidance_cap", 0), ("negative_prompt", 3)])
def test_bad_preset_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


def test_ddim_schedules():
    from diffusers import DDIMScheduler

    # A checkpoint whose scheduler says steps_offset 0 (as the authors' script builds it).
    pipe = MagicFacePipeline.tiny(seed=0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=0)
    authors = pipe.make_scheduler(GenerationConfig())
    checkpoint = pipe.make_scheduler(GenerationConfig(ddim_schedule="checkpoint"))
    authors.set_timesteps(50)
    checkpoint.set_timesteps(50)
    # What their code runs: diffusers' StableDiffusionPipeline rewrites steps_offset to 1.
    assert authors.timesteps.tolist() == list(range(981, 0, -20))
    assert checkpoint.timesteps.tolist() == list(range(980, -1, -20))
    sd = sd_pipeline(pipe)
    sd.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", clip_sample=False,
                                 set_alpha_to_one=False)
    assert sd.scheduler.config.steps_offset == 0
    sd = type(sd)(**sd.components)
    assert sd.scheduler.config.steps_offset == 1  # the fix-up the authors' code runs under


@pytest.mark.parametrize("preset", ["authors", "paper"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_text_to_image_is_plain_stable_diffusion_under_both_presets(preset, guidance):
    from diffusers import DDIMScheduler

    pipe = MagicFacePipeline.tiny(seed=0)
    # steps_offset 0 in the checkpoint makes the two presets' schedules differ.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=0)
    cfg = GenerationConfig(steps=6, height=128, width=96, seed=3, guidance_scale=guidance,
                           preset=preset).resolve(0)
    ours = pipe.generate("a man wearing a hat", [], cfg)
    scheduler = pipe.make_scheduler(cfg)
    # (StableDiffusionPipeline's constructor rewrites steps_offset in place: set it after.)
    sd = sd_pipeline(pipe)
    sd.scheduler = scheduler
    lat = sd(prompt="a man wearing a hat", negative_prompt=cfg.negative_prompt,
             num_inference_steps=6, guidance_scale=guidance, height=128, width=96, eta=0.0,
             generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    torch.testing.assert_close(ours.latents, lat, atol=1e-6, rtol=1e-5)
    assert ours.semantic_maps == [] and ours.rsa_steps == 0
    assert ours.config.negative_prompt == (AUTHORS_NEGATIVE_PROMPT if preset == "authors"
                                           else "")


def test_the_presets_differ_with_concepts(pipe, small_config):
    prompt, concepts = example_concepts("trio", limit=2)
    a = pipe.generate(prompt, concepts, small_config)
    p = pipe.generate(prompt, concepts, small_config.replace(preset="paper"))
    assert not torch.allclose(a.latents, p.latents, atol=1e-3)
    assert a.config.preset == "authors" and p.config.region_guidance is False


@pytest.mark.parametrize("fast", [True, False])
def test_explicit_noise_reproduces_a_run(pipe, small_config, fast):
    prompt, concepts = example_concepts("trio", limit=2)
    cfg = small_config.replace(fast_path=fast)
    g = torch.Generator().manual_seed(11)
    z_t = torch.randn(1, 4, 16, 16, generator=g)
    noise = torch.randn(cfg.steps, 2, 4, 16, 16, generator=g)
    a = pipe.generate(prompt, concepts, cfg, latents=z_t, reference_noise=noise)
    b = pipe.generate(prompt, concepts, cfg.replace(seed=99, reference_seed=5), latents=z_t,
                      reference_noise=noise)
    assert torch.equal(a.latents, b.latents)  # the seeds no longer matter
    seeded = pipe.generate(prompt, concepts, cfg)
    assert not torch.allclose(a.latents, seeded.latents, atol=1e-3)
    # Each tensor does its own part: new target noise alone changes the image.
    c = pipe.generate(prompt, concepts, cfg, latents=z_t + 0.1, reference_noise=noise)
    assert not torch.allclose(a.latents, c.latents, atol=1e-3)


@pytest.mark.parametrize("fast", [True, False])
def test_the_seeded_draws_given_explicitly_give_the_seeded_run(pipe, small_config, fast):
    from diffusers.utils.torch_utils import randn_tensor

    prompt, concepts = example_concepts("trio", limit=2)
    cfg = small_config.replace(fast_path=fast)
    seeded = pipe.generate(prompt, concepts, cfg)
    z_t = randn_tensor((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(cfg.seed))
    noise = torch.stack([torch.stack([reference_noise((4, 16, 16), cfg.seed, j, i)
                                      for j in range(2)]) for i in range(cfg.steps)])
    explicit = pipe.generate(prompt, concepts, cfg, latents=z_t, reference_noise=noise)
    assert torch.equal(explicit.latents, seeded.latents)


def test_explicit_noise_is_part_of_the_cache_key(small_config):
    pipe = MagicFacePipeline.tiny(seed=0)
    cache = pipe.enable_kv_cache()
    prompt, concepts = example_concepts("trio", limit=1)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(small_config.steps, 1, 4, 16, 16, generator=g)
    first = pipe.generate(prompt, concepts, small_config, reference_noise=noise)
    again = pipe.generate(prompt, concepts, small_config, reference_noise=noise)
    other = pipe.generate(prompt, concepts, small_config, reference_noise=noise + 0.5)
    assert (first.cache_misses, again.cache_hits, other.cache_misses) == (1, 1, 1)
    assert torch.equal(first.latents, again.latents)
    assert len(cache) == 2


def test_explicit_noise_shapes_are_checked(pipe, small_config):
    prompt, concepts = example_concepts("trio", limit=2)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 16, 16\)"):
        pipe.generate(prompt, concepts, small_config, latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"reference_noise must have shape \(5, 2, 4, 16, 16\)"):
        pipe.generate(prompt, concepts, small_config, reference_noise=torch.zeros(5, 1, 4, 16, 16))


def test_authors_without_cfg_runs_rsa_throughout(pipe, small_config):
    # Their semantic map is computed in the guidance branch: without CFG there is none.
    concepts = [noise_image(1), noise_image(2)]
    from magicface_core import Concept

    cs = [Concept(image=concepts[0], mask=mask_image(box=(0, 0, 50, 50)), word="man"),
          Concept(image=concepts[1], mask=mask_image(box=(20, 20, 90, 80)), word="hat")]
    res = pipe.generate("a man with a hat", cs, small_config.replace(guidance_scale=1.0))
    assert res.rsa_steps == small_config.steps
    paper = pipe.generate("a man with a hat", cs,
                          small_config.replace(guidance_scale=1.0, preset="paper"))
    assert paper.rsa_steps == 2
