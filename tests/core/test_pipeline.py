"""The sampling loop on the tiny model: parity with diffusers, determinism, the role
of masks, the callback, and the real loading path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_core import Concept, GenerationConfig, MagicFacePipeline
from magicface_core.attention import ReferenceAttnProcessor
from magicface_core.models import sharpen_attention
from magicface_core.pipeline import GenerationRequest

from ..helpers.examples import example_concepts
from ..helpers.images import mask_image, noise_image, solid
from ..helpers.pipeline import assert_latents_close


def sd_pipeline(pipe: MagicFacePipeline):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_no_concepts_matches_stable_diffusion_pipeline(pipe, guidance):
    cfg = GenerationConfig(steps=6, height=128, width=96, seed=3, guidance_scale=guidance,
                           negative_prompt="a photo")
    ours = pipe.generate("a man wearing a hat", [], cfg)
    sd = sd_pipeline(pipe)
    kw = dict(prompt="a man wearing a hat", negative_prompt="a photo", num_inference_steps=6,
              guidance_scale=guidance, height=128, width=96, eta=0.0)
    lat = sd(**kw, generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    torch.testing.assert_close(ours.latents, lat, atol=1e-6, rtol=1e-5)
    img = sd(**kw, generator=torch.Generator("cpu").manual_seed(3), output_type="pil").images[0]
    assert np.abs(arr(ours.image) - arr(img)).max() <= 1
    assert ours.semantic_maps == [] and ours.rsa_steps == 0


@pytest.mark.parametrize("preset,extra", [("paper", {}),
                                          ("authors", {"region_guidance": False})])
def test_empty_masks_have_no_effect(pipe, small_config, preset, extra):
    # An invariant of Eqs. 2 and 6. Under "authors" region guidance reads the map
    # whatever the masks, so it is off for this check.
    cfg = small_config.replace(preset=preset, **extra)
    prompt = "a man wearing a hat"
    base = pipe.generate(prompt, [], cfg)
    concepts = [
        Concept(image=noise_image(1), mask=mask_image(), word="man", weight=3.0),
        Concept(image=noise_image(2), mask=mask_image(), word="hat", weight=5.0,
                reference_prompt="a red hat"),
    ]
    for alpha in (0.0, 0.4, 1.0):
        masked_out = pipe.generate(prompt, concepts, cfg.replace(alpha=alpha))
        assert_latents_close(masked_out.latents, base.latents)
        assert len(masked_out.semantic_maps) == small_config.steps


def test_references_change_the_image_through_their_masks(pipe, small_config):
    prompt, concepts = example_concepts("trio")
    base = pipe.generate(prompt, [], small_config)
    res = pipe.generate(prompt, concepts, small_config)
    assert res.image.size == (128, 128)
    assert not torch.allclose(res.latents, base.latents, atol=1e-4)
    assert res.rsa_steps == 3  # the authors': RBA once step > int(0.4 * 5)
    paper = pipe.generate(prompt, concepts, small_config.replace(preset="paper"))
    assert paper.rsa_steps == 2  # the paper's: round(0.4 * 5)
    for m in res.semantic_maps:
        assert m.shape == (8, 8) and m.dtype == torch.long
        assert int(m.min()) >= 0 and int(m.max()) <= 3
    assert [len(t) for t in res.concept_tokens] == [1, 1, len("sunglasses")]


def test_same_seed_same_image_different_seed_different_image(pipe, small_config):
    prompt, concepts = example_concepts("trio", limit=2)
    a = pipe.generate(prompt, concepts, small_config)
    b = pipe.generate(prompt, concepts, small_config)
    c = pipe.generate(prompt, concepts, small_config.replace(seed=8))
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(arr(a.image), arr(b.image))
    assert all(torch.equal(x, y) for x, y in zip(a.semantic_maps, b.semantic_maps, strict=True))
    assert not torch.allclose(a.latents, c.latents)


def test_reference_seed_changes_only_the_reference_noise(pipe, small_config):
    prompt, concepts = example_concepts("trio", limit=1)
    a = pipe.generate(prompt, concepts, small_config.replace(reference_seed=1))
    b = pipe.generate(prompt, concepts, small_config.replace(reference_seed=2))
    assert not torch.allclose(a.latents, b.latents)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_rba_only_and_rsa_only_run(pipe, small_config, alpha):
    prompt, concepts = example_concepts("synthetic")
    res = pipe.generate(prompt, concepts, small_config.replace(alpha=alpha))
    # alpha 0 under the authors' rule still runs step 0 with RSA (no map exists yet).
    assert res.rsa_steps == (small_config.steps if alpha == 1.0 else 1)
    paper = pipe.generate(prompt, concepts, small_config.replace(alpha=alpha, preset="paper"))
    assert paper.rsa_steps == (small_config.steps if alpha == 1.0 else 0)
    assert np.isfinite(res.latents.numpy()).all()
    assert len(res.semantic_maps) == small_config.steps


def test_stage_split_changes_the_result(pipe, small_config):
    prompt, concepts = example_concepts("synthetic")
    rsa_only = pipe.generate(prompt, concepts, small_config.replace(alpha=1.0))
    rba_only = pipe.generate(prompt, concepts, small_config.replace(alpha=0.0))
    assert not torch.allclose(rsa_only.latents, rba_only.latents, atol=1e-5)


def test_on_step_reports_every_step_and_an_exception_aborts_cleanly(pipe, small_config):
    prompt, concepts = example_concepts("trio", limit=2)
    before = dict(pipe.unet.attn_processors)
    seen = []
    pipe.generate(prompt, concepts, small_config, on_step=lambda s, n: seen.append((s, n)))
    assert seen == [(i, 5) for i in range(1, 6)]

    class Stop(Exception):
        pass

    def stop_at_3(step, total):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        pipe.generate(prompt, concepts, small_config, on_step=stop_at_3)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, ReferenceAttnProcessor) for p in after.values())


def test_on_references_is_told_once_between_the_references_and_the_first_step(
        pipe, small_config, monkeypatch):
    # The CLI's cue to end its bar over the references and start the one over the
    # steps: it used to wrap the instance's prepare_references to learn it.
    prompt, concepts = example_concepts("trio", limit=2)
    events = []
    real = pipe.prepare_references

    def spy(cs, cfg):
        refs = real(cs, cfg)
        events.append(("prepared", len(refs)))
        return refs

    def step(s, n):
        events.append(("step", s))

    monkeypatch.setattr(pipe, "prepare_references", spy)
    steps = [("step", i) for i in range(1, 6)]
    pipe.generate(prompt, concepts, small_config, on_step=step,
                  on_references=lambda n: events.append(("references", n)))
    assert events == [("prepared", 2), ("references", 2), *steps]

    events.clear()
    pipe.generate(prompt, [], small_config, on_step=step,
                  on_references=lambda n: events.append(("references", n)))
    assert events == [("prepared", 0), ("references", 0), *steps]

    # In a batch, each request is told of its own references, all before any step.
    events.clear()
    pipe.generate_batch([
        GenerationRequest(prompt, concepts, small_config, step,
                          on_references=lambda n: events.append(("a", n))),
        GenerationRequest(prompt, concepts[:1], small_config, step,
                          on_references=lambda n: events.append(("b", n)))])
    assert events[:4] == [("prepared", 2), ("a", 2), ("prepared", 1), ("b", 1)]
    assert all(e[0] == "step" for e in events[4:])

    class Stop(Exception):
        pass

    def stop(n):
        raise Stop()

    events.clear()
    with pytest.raises(Stop):
        pipe.generate(prompt, concepts, small_config, on_step=step, on_references=stop)
    assert events == [("prepared", 2)]  # aborted before the first step


def test_no_guidance_with_concepts(pipe, small_config):
    prompt, concepts = example_concepts("trio", limit=1)
    res = pipe.generate(prompt, concepts, small_config.replace(guidance_scale=1.0))
    assert np.isfinite(res.latents.numpy()).all()


def test_optional_extras_run_and_change_the_result(pipe, small_config):
    prompt, concepts = example_concepts("trio", limit=2)
    base = pipe.generate(prompt, concepts, small_config.replace(region_guidance=False))
    rg = pipe.generate(prompt, concepts, small_config.replace(region_guidance=True))
    assert not torch.allclose(rg.latents, base.latents)
    default = pipe.generate(prompt, concepts, small_config)  # "authors": guidance on
    assert torch.equal(default.latents, rg.latents)
    ca = pipe.generate(prompt, concepts, small_config.replace(ca_scale=0.05))
    assert np.isfinite(ca.latents.numpy()).all()


def test_non_square_size(pipe):
    prompt, concepts = example_concepts("trio", limit=2)
    res = pipe.generate(prompt, concepts, GenerationConfig(steps=3, height=128, width=192))
    assert res.image.size == (192, 128)
    assert res.semantic_maps[-1].shape == (8, 12)


def test_texture_transfer_with_a_non_human_word(pipe, small_config):
    # A synthetic "marble" texture: veined greys.
    y, x = np.mgrid[0:96, 0:96]
    veins = (np.sin(x / 5.0 + 3 * np.sin(y / 11.0)) + 1) * 100 + 40
    marble = Image.fromarray(np.stack([veins] * 3, -1).astype(np.uint8))
    res = pipe.generate("a vase on a table",
                        [Concept(image=marble, mask=mask_image((96, 96), (0, 0, 96, 96)),
                                 word="vase", weight=2.0, reference_prompt="marble")],
                        small_config)
    assert res.image.size == (128, 128)
    assert res.concept_tokens == [[2]]
    assert any((m == 1).any() for m in res.semantic_maps)


def test_saved_tiny_model_loads_back_through_from_pretrained(pipe, small_config, tmp_path):
    path = pipe.save_pretrained(tmp_path / "tiny-sd")
    assert (path / "model_index.json").is_file()
    loaded = MagicFacePipeline.from_pretrained(str(path), device="cpu")
    assert loaded.dtype == torch.float32
    prompt, concepts = example_concepts("trio", limit=2)
    a = pipe.generate(prompt, concepts, small_config)
    b = loaded.generate(prompt, concepts, small_config)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-6, rtol=1e-6)
    # And diffusers itself reads the folder.
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    assert list(sd.unet.config.block_out_channels) == [8, 16, 16, 16]


def test_sd2_style_unet(small_config):
    """SD2.x UNets use linear projections and per-level head counts."""
    from diffusers import UNet2DConditionModel

    sd1 = MagicFacePipeline.tiny(seed=1)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16, 16),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True,
    ).eval()
    sharpen_attention(unet)  # as the tiny model's: peaked maps, not rounding-decided ones
    pipe = MagicFacePipeline(unet, sd1.vae, sd1.text_encoder, sd1.tokenizer, sd1.scheduler)
    prompt, concepts = example_concepts("trio", limit=2)
    res = pipe.generate(prompt, concepts, small_config)
    assert np.isfinite(res.latents.numpy()).all()
    # Per-level head dims differ from SD1.5's: the folded bias (the default) reads them
    # per layer; the dense form agrees too.
    slow = pipe.generate(prompt, concepts, small_config.replace(fast_path=False))
    assert pipe.fold_attention_bias
    pipe.fold_attention_bias = False
    dense = pipe.generate(prompt, concepts, small_config)
    assert_latents_close(dense.latents, slow.latents)
    assert_latents_close(res.latents, slow.latents)


def test_solid_reference_with_full_mask_runs(pipe, small_config):
    res = pipe.generate("a man", [Concept(image=solid((200, 30, 30)), word="man",
                                          mask=mask_image(box=(0, 0, 96, 80)))], small_config)
    assert res.masks[0].all() is not None
    # The letterbox padding lies outside the mask.
    assert not res.masks[0].all()
