"""Mask decoding, letterboxing and the segment-anything path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_core import Concept, GenerationConfig
from magicface_core.masks import binarize_mask, letterbox, load_image, sam_mask
from magicface_core.reference import prepare_reference

from ..helpers.examples import EXAMPLES
from ..helpers.images import mask_image, noise_image
from ..helpers.pipeline import tiny_sam


def test_threshold_is_half_grey():
    m = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8), "L")
    assert binarize_mask(m).tolist() == [[False, False, True, True]]


def test_transparent_pixels_are_outside():
    rgba = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    rgba.putpixel((1, 0), (255, 255, 255, 0))
    assert binarize_mask(rgba).tolist() == [[True, False]]


def test_jpeg_masks_keep_their_edges():
    # The examples' masks are JPEGs: the exact-255 rule of the authors' code drops
    # compression-noisy pixels; the 50% threshold keeps them.
    m = Image.open(EXAMPLES / "trio" / "hat_mask.jpg")
    grey = np.asarray(m.convert("L"))
    ours = binarize_mask(m).sum()
    assert ours > 0
    assert ours >= (grey == 255).sum()


def test_letterbox_keeps_aspect_ratio_and_pads_outside_the_mask():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    boxed = letterbox(img, 128, 128)
    a = np.asarray(boxed)
    assert boxed.size == (128, 128)
    assert (a[:31] == 0).all() and (a[-31:] == 0).all()  # padding rows top and bottom
    assert (a[40:88, :, 0] == 255).all()

    concept = Concept(image=img, mask=mask_image((200, 100), (0, 0, 200, 100)), word="hat")
    ref = prepare_reference(concept, 0, 128, 128)
    assert ref.mask.shape == (128, 128) and ref.pixels.shape == (1, 3, 128, 128)
    assert not ref.mask[:31].any() and ref.mask[40:88].all()
    assert float(ref.pixels.min()) >= -1.0 and float(ref.pixels.max()) <= 1.0


def test_mask_size_must_match_its_image():
    c = Concept(image=noise_image(0, (96, 80)), mask=mask_image((80, 96)), word="man")
    with pytest.raises(ValueError, match=r"concepts\[0\] \('man'\) mask is 80x96 but its image "
                                         r"is 96x80"):
        prepare_reference(c, 0, 128, 128)


def test_unreadable_images_are_named():
    with pytest.raises(ValueError, match="image: could not decode"):
        load_image(b"definitely not a png", "image")
    with pytest.raises(ValueError, match="file not found"):
        load_image("/nonexistent/x.png")
    c = Concept(image=b"\x89PNG broken", word="man", mask=mask_image())
    with pytest.raises(ValueError, match=r"concepts\[2\] \('man'\) image: could not decode"):
        prepare_reference(c, 2, 128, 128)


def test_image_bytes_decode():
    buf = io.BytesIO()
    noise_image(3).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (96, 80)


def test_no_mask_and_no_sam_is_an_error(pipe, small_config):
    c = Concept(image=noise_image(0), word="man")
    with pytest.raises(ValueError, match="has no mask and no sam_checkpoint"):
        pipe.generate("a man", [c], small_config)


def test_missing_sam_checkpoint_file(pipe, small_config):
    c = Concept(image=noise_image(0), word="man")
    with pytest.raises(ValueError, match="sam_checkpoint: file not found"):
        pipe.generate("a man", [c], small_config.replace(sam_checkpoint="/nope/sam.pth"))


def test_sam_predictor_gives_a_mask_of_the_image_size():
    from segment_anything import SamPredictor

    predictor = SamPredictor(tiny_sam())
    img = noise_image(4, (90, 60))
    m = sam_mask(predictor, img)
    assert m.shape == (60, 90) and m.dtype == bool
    m2 = sam_mask(predictor, img, box=(10, 10, 50, 40))
    assert m2.shape == (60, 90)


def test_sam_checkpoint_loads_through_the_registry_path(pipe, tmp_path, monkeypatch):
    """A checkpoint file is read by segment-anything's own builder."""
    import segment_anything

    from magicface_core.masks import load_sam_predictor

    sam = tiny_sam()
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), ckpt)

    def build_tiny(checkpoint=None):
        model = tiny_sam()
        model.load_state_dict(torch.load(checkpoint))
        return model

    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", build_tiny)
    predictor = load_sam_predictor(str(ckpt), "tiny")
    for a, b in zip(predictor.model.state_dict().values(), sam.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_generate_with_an_automatic_mask(pipe):
    from segment_anything import SamPredictor

    pipe.sam_predictor = SamPredictor(tiny_sam())
    try:
        res = pipe.generate("a man wearing a hat",
                            [Concept(image=noise_image(5), word="man"),
                             Concept(image=noise_image(6), word="hat", box=(5, 5, 60, 40))],
                            GenerationConfig(steps=2, height=128, width=128))
    finally:
        pipe.sam_predictor = None
    assert res.image.size == (128, 128)
    assert [m.shape for m in res.masks] == [(128, 128), (128, 128)]


def test_box_outside_image_is_rejected(pipe):
    from segment_anything import SamPredictor

    pipe.sam_predictor = SamPredictor(tiny_sam())
    try:
        with pytest.raises(ValueError, match="box .* lies outside"):
            pipe.generate("a man", [Concept(image=noise_image(5), word="man",
                                            box=(0, 0, 500, 40))],
                          GenerationConfig(steps=2, height=128, width=128))
    finally:
        pipe.sam_predictor = None
