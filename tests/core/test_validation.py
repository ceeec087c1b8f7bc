"""Every bad input is a ValueError that names the problem."""

from __future__ import annotations

import math

import pytest

from magicface_core import Concept, GenerationConfig

from ..helpers.images import mask_image, noise_image


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_prompt(pipe, small_config, prompt):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pipe.generate(prompt, [], small_config)


def test_word_not_in_prompt(pipe, small_config):
    c = Concept(image=noise_image(0), mask=mask_image(), word="scarf")
    with pytest.raises(ValueError, match="concept word 'scarf' does not occur in the prompt"):
        pipe.generate("a man wearing a hat", [c], small_config)


def test_duplicate_words(pipe, small_config):
    cs = [Concept(image=noise_image(0), mask=mask_image(), word="man"),
          Concept(image=noise_image(1), mask=mask_image(), word="Man")]
    with pytest.raises(ValueError, match="used by more than one concept"):
        pipe.generate("a man", cs, small_config)


def test_unreadable_image(pipe, small_config):
    c = Concept(image=b"GIF89a-garbage", mask=mask_image(), word="man")
    with pytest.raises(ValueError, match="could not decode"):
        pipe.generate("a man", [c], small_config)


def test_mask_size_mismatch(pipe, small_config):
    c = Concept(image=noise_image(0, (64, 64)), mask=mask_image((32, 32)), word="man")
    with pytest.raises(ValueError, match="mask is 32x32 but its image is 64x64"):
        pipe.generate("a man", [c], small_config)


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf, "3"])
def test_bad_weight(weight):
    with pytest.raises(ValueError, match="weight of concept 'man'"):
        Concept(image=noise_image(0), word="man", weight=weight)


@pytest.mark.parametrize("steps", [0, 201, -5, 2.5, True])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match="steps must"):
        GenerationConfig(steps=steps)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, math.nan])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha must"):
        GenerationConfig(alpha=alpha)


@pytest.mark.parametrize("field,value", [("height", 500), ("width", 257), ("height", 32),
                                         ("width", 4096)])
def test_size(field, value):
    with pytest.raises(ValueError, match=f"{field} must"):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("guidance_scale", math.nan, "guidance_scale must be finite"),
    ("guidance_scale", -1.0, "guidance_scale must be in"),
    ("seed", -1, "seed must be in"),
    ("ca_scale", 0.0, "ca_scale must be in"),
    ("map_downscale", 3, "map_downscale must be one of"),
    ("reference_layers", ["up_blocks.2"], "reference_layers must be a tuple"),
])
def test_other_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**{field: value})


def test_empty_word():
    with pytest.raises(ValueError, match="concept word must be a non-empty string"):
        Concept(image=noise_image(0), word=" ")


def test_unknown_reference_layer(pipe, small_config):
    c = Concept(image=noise_image(0), mask=mask_image(), word="man")
    with pytest.raises(ValueError, match="match no self-attention layer"):
        pipe.generate("a man", [c], small_config.replace(reference_layers=("up_blocks.9",)))


def test_rsa_steps_rounds_half_up_under_the_paper_rule():
    paper = GenerationConfig(preset="paper")
    assert paper.replace(steps=50, alpha=0.4).rsa_steps == 20
    assert paper.replace(steps=5, alpha=0.5).rsa_steps == 3
    assert paper.replace(steps=5, alpha=0.0).rsa_steps == 0
    assert paper.replace(steps=5, alpha=1.0).rsa_steps == 5


def test_rsa_steps_under_the_authors_rule():
    # Their attention switches to RBA when the step index > int(alpha * steps).
    for steps, alpha in [(50, 0.4), (5, 0.5), (8, 0.0), (7, 0.3), (3, 1.0), (50, 0.999)]:
        want = min(steps, len([i for i in range(steps) if not i > int(alpha * steps)]))
        assert GenerationConfig(steps=steps, alpha=alpha).rsa_steps == want
    assert GenerationConfig(steps=50, alpha=0.4).rsa_steps == 21
    # The field overrides the preset's rule either way.
    assert GenerationConfig(steps=50, alpha=0.4, rba_start="round").rsa_steps == 20
    assert GenerationConfig(steps=50, alpha=0.4, preset="paper",
                            rba_start="after_floor").rsa_steps == 21
