"""Mask proposals from the concept word (magicface_core.auto_masks): the pure helpers,
the routing between face detector, text detector and segmenter (with fakes), and the
real models: MTCNN on a photo, a tiny random Grounding DINO loaded from a folder, a
tiny random SAM. Nothing is downloaded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_core import MagicFaceInputError
from magicface_core.auto_masks import (
    FACE_ABOVE,
    FACE_BELOW,
    FACE_WIDTH,
    FaceDetector,
    GroundingDinoDetector,
    MaskProposer,
    SamSegmenter,
    best_detection,
    detection_text,
    ellipse_mask,
    grow_face_box,
    is_person_word,
    person_word,
    pixel_box,
    propose_mask,
    soft_ellipse,
)

from ..helpers.detectors import tiny_grounding_dino
from ..helpers.images import noise_image
from ..helpers.pipeline import tiny_sam

# -- pure helpers ----------------------------------------------------------------------


def test_face_box_grows_to_head_and_shoulders_clipped_to_the_image():
    # A 20x30 face: 1.6x as wide about its centre, 0.6 face-heights above, 1.4 below.
    assert (FACE_WIDTH, FACE_ABOVE, FACE_BELOW) == (1.6, 0.6, 1.4)
    assert grow_face_box((40, 40, 60, 70), (200, 200)) == (34, 22, 66, 112)
    assert grow_face_box((40, 40, 60, 70), (100, 100)) == (34, 22, 66, 100)
    assert grow_face_box((0, 5, 20, 35), (100, 100)) == (0, 0, 26, 77)
    with pytest.raises(ValueError, match="outside"):
        grow_face_box((300, 300, 320, 330), (100, 100))


def test_ellipse_fills_its_box_and_nothing_else():
    m = ellipse_mask((120, 80), (20, 10, 100, 70))
    assert m.mode == "L" and m.size == (120, 80)
    a = np.asarray(m)
    assert set(np.unique(a)) == {0, 255}
    on = a == 255
    assert on.sum() == pytest.approx(math.pi * 40 * 30, rel=0.02)
    assert not on[:10].any() and not on[70:].any() and not on[:, :20].any() \
        and not on[:, 100:].any()
    assert on[40, 60] and not on[11, 21]  # the centre in, the box's corner out
    soft = np.asarray(soft_ellipse((120, 80), (20, 10, 100, 70)))
    assert ((soft > 0) & (soft < 255)).any()  # a soft edge...
    assert np.array_equal(soft >= 128, on)  # ...whose half-grey line is the mask


def test_best_detection_keeps_boxes_above_the_threshold_inside_the_image():
    size = (100, 80)
    dets = [((10, 10, 20, 20), 0.5), ((0.5, 1.2, 60.3, 70.9), 0.9),
            ((200, 200, 300, 300), 0.99), ((30, 30, 40, 40), 0.3)]
    assert best_detection(dets, 0.3, size) == ((0, 1, 61, 71), 0.9)
    assert best_detection(dets, 0.9, size) is None  # strictly above
    assert best_detection([], 0.0, size) is None
    # Faces (by_area): the biggest, whatever its score.
    faces = [((10, 10, 20, 20), 0.999), ((30, 30, 70, 70), 0.95)]
    assert best_detection(faces, 0.3, size, by_area=True) == ((30, 30, 70, 70), 0.95)
    assert pixel_box((-5, 10, 120, 90), size) == (0, 10, 100, 80)
    assert pixel_box((50, 50, 50, 60), size) is None


@pytest.mark.parametrize("word,head", [
    ("Men", "man"), ("woman's", "woman"), ("Women\u2019s", "woman"), ("ladies", "lady"),
    ("Babies", "baby"), ("old  man", "man"), ("children", "child"), ("Kids", "kid"),
    ("people", "people"), ("boys'", "boy"), ("Red Hats", "hats"), ("boss", "boss"),
])
def test_person_word_is_the_singular_head_noun(word, head):
    assert person_word(word) == head


def test_person_words():
    for w in ("man", "Men", "a young woman", "girls", "person", "face", "people", "guy"):
        assert is_person_word(w), w
    for w in ("hat", "dog", "glasses", "boss", "manhole", ""):
        assert not is_person_word(w), w


def test_detection_text_is_lower_case_phrases_with_the_word_first():
    assert detection_text("Red  Hat") == "red hat."
    assert detection_text("hat", "A photo of a red hat.") == "hat. a photo of a red hat."
    assert detection_text("hat", "  ") == "hat."


# -- routing, with fakes ---------------------------------------------------------------

class FakeDetector:
    def __init__(self, detections):
        self.detections, self.calls = detections, []

    def detect(self, image, text=None):
        self.calls.append(text)
        return list(self.detections)


class FakeSegmenter:
    def __init__(self, fill=True):
        self.fill, self.boxes = fill, []

    def segment(self, image, box):
        self.boxes.append(box)
        m = np.zeros((image.height, image.width), dtype=bool)
        if self.fill:
            m[box[1]:box[3], box[0]:box[2]] = True
        return m


IMG = noise_image(0, (200, 160))


def test_a_person_word_uses_the_face_first():
    faces, text, seg = FakeDetector([((80, 40, 120, 90), 0.99)]), FakeDetector([]), \
        FakeSegmenter()
    p = propose_mask(IMG, "Woman", detector=text, segmenter=seg, face_detector=faces)
    assert p.source == "face+sam" and p.score == pytest.approx(0.99)
    assert p.box == grow_face_box((80, 40, 120, 90), IMG.size) == seg.boxes[0]
    assert text.calls == []  # the text detector was not needed
    assert p.mask.mode == "L" and p.mask.size == IMG.size
    assert set(np.unique(np.asarray(p.mask))) == {0, 255}
    p = propose_mask(IMG, "man", face_detector=faces)
    assert p.source == "face+ellipse" and p.box == grow_face_box((80, 40, 120, 90), IMG.size)


def test_a_person_word_without_a_face_falls_back_to_the_text_detector():
    text = FakeDetector([((10, 20, 110, 150), 0.6)])
    p = propose_mask(IMG, "man", detector=text, face_detector=FakeDetector([]))
    assert (p.source, p.box) == ("detector+ellipse", (10, 20, 110, 150))
    assert text.calls == ["man."]


def test_a_thing_uses_the_text_detector_and_the_segmenter():
    faces, seg = FakeDetector([((80, 40, 120, 90), 0.99)]), FakeSegmenter()
    text = FakeDetector([((10, 20, 50, 60), 0.4), ((60, 20, 150, 100), 0.7)])
    p = propose_mask(IMG, "Hat", detector=text, segmenter=seg, face_detector=faces,
                     reference_prompt="a photo of a red hat")
    assert (p.source, p.box, p.score) == ("detector+sam", (60, 20, 150, 100),
                                          pytest.approx(0.7))
    assert faces.calls == [] and text.calls == ["hat. a photo of a red hat."]
    assert np.asarray(p.mask).astype(bool).sum() == 90 * 80
    p = propose_mask(IMG, "hat", detector=text)
    assert p.source == "detector+ellipse"


def test_nothing_found_is_a_clear_error_naming_the_word_and_the_reference():
    text = FakeDetector([((10, 20, 50, 60), 0.2)])
    with pytest.raises(MagicFaceInputError,
                       match=r"no 'hat' found in reference 3 .*; pass a mask or a box"):
        propose_mask(IMG, "hat", detector=text, index=2)
    with pytest.raises(MagicFaceInputError, match="no 'man' found in the reference "
                       r"\(looked with a face detector and a text detector"):
        propose_mask(IMG, "man", detector=text, face_detector=FakeDetector([]))
    with pytest.raises(MagicFaceInputError, match="no detector was given"):
        propose_mask(IMG, "man", index=0)
    with pytest.raises(MagicFaceInputError, match="'hat' segmented in reference 1"):
        propose_mask(IMG, "hat", detector=FakeDetector([((10, 20, 50, 60), 0.9)]),
                     segmenter=FakeSegmenter(fill=False), index=0)


def test_bad_inputs_are_refused():
    with pytest.raises(MagicFaceInputError, match="threshold"):
        propose_mask(IMG, "hat", threshold=float("nan"))
    with pytest.raises(MagicFaceInputError, match="word of reference 2"):
        propose_mask(IMG, " ", index=1)
    with pytest.raises(MagicFaceInputError, match="reference 1 image: file not found"):
        propose_mask("/nope.png", "hat", index=0)


def test_the_proposer_takes_what_load_image_takes(tmp_path):
    path = tmp_path / "ref.png"
    IMG.save(path)
    text = FakeDetector([((10, 20, 50, 60), 0.5)])
    proposer = MaskProposer(detector=text, threshold=0.45)
    for source in (path, str(path), path.read_bytes(), np.asarray(IMG)):
        assert proposer(source, "hat", reference_prompt="a hat").box == (10, 20, 50, 60)
    with pytest.raises(MagicFaceInputError, match="reference 4"):
        MaskProposer(detector=text, threshold=0.5)(IMG, "hat", index=3)
    bare = MaskProposer.from_settings(faces=False)
    assert (bare.detector, bare.segmenter, bare.face_detector) == (None, None, None)


# -- the real models -------------------------------------------------------------------

@pytest.fixture(scope="module")
def faces():
    return FaceDetector()


def test_mtcnn_finds_the_astronauts_face(faces):
    from skimage import data

    img = Image.fromarray(data.astronaut())  # 512x512, Eileen Collins
    p = propose_mask(img, "woman", face_detector=faces)
    assert p.source == "face+ellipse" and p.score > 0.9
    x0, y0, x1, y1 = p.box
    # Her face is about x 180-270, y 60-175: the head-and-shoulders box holds it and
    # sits in the upper part of the photo.
    assert x0 < 180 and x1 > 270 and y0 < 60 and (y0 + y1) / 2 < 256
    on = np.asarray(p.mask) == 255
    assert on[115, 225]  # the middle of the face
    assert 0.03 < on.mean() < 0.4
    # The bar: at least 95% of MTCNN's own face box inside the mask, and not
    # the whole image (at most 60% of it).
    (fx0, fy0, fx1, fy1), _ = max(faces.detect(img),
                                  key=lambda d: (d[0][2] - d[0][0]) * (d[0][3] - d[0][1]))
    face = on[int(fy0):int(fy1), int(fx0):int(fx1)]
    assert face.mean() >= 0.95 and on.mean() <= 0.6, (face.mean(), on.mean())


def test_mtcnn_on_a_cat_is_a_clear_error(faces):
    from skimage import data

    with pytest.raises(MagicFaceInputError, match="no 'man' found in reference 1"):
        propose_mask(Image.fromarray(data.chelsea()), "man", face_detector=faces, index=0)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return tiny_grounding_dino(tmp_path_factory.mktemp("dino"))


def test_grounding_dino_loads_from_a_folder_and_gives_boxes_in_the_image(dino_dir):
    det = GroundingDinoDetector.from_pretrained(dino_dir)
    img = noise_image(1, (90, 60))
    found = det.detect(img, detection_text("hat", "a photo of a red hat"))
    assert found
    for (x0, y0, x1, y1), score in found:
        assert 0 <= x0 <= x1 <= 90 and 0 <= y0 <= y1 <= 60 and 0.0 <= score <= 1.0
    p = propose_mask(img, "hat", detector=det, threshold=0.0, index=0)
    assert p.source == "detector+ellipse" and p.mask.size == (90, 60)
    assert 0 <= p.box[0] < p.box[2] <= 90 and 0 <= p.box[1] < p.box[3] <= 60
    with pytest.raises(MagicFaceInputError, match="no 'hat' found in reference 1"):
        propose_mask(img, "hat", detector=det, threshold=1.01, index=0)
    # A reference prompt past the text encoder's length is cut, not an error.
    assert det.detect(img, detection_text("hat", " ".join(["a red hat"] * 40)))


def test_grounding_dino_scores_boxes_by_the_first_phrase_only(dino_dir):
    det = GroundingDinoDetector.from_pretrained(dino_dir)
    img = noise_image(2, (90, 60))
    inputs = det.processor(images=img, text="red hat. dog.", return_tensors="pt")
    with torch.inference_mode():
        logits = det.model(**inputs).logits[0]
    tokens = det.processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens[:4] == ["[CLS]", "red", "hat", "."]
    want = sorted(torch.sigmoid(logits[:, 1:3]).max(-1).values.tolist())
    got = sorted(s for _, s in det.detect(img, "red hat. dog."))
    assert got == pytest.approx(want, abs=1e-6)


def test_sam_segments_a_box_into_a_binary_mask_of_the_image_size():
    from segment_anything import SamPredictor

    img = noise_image(3, (90, 60))
    for seg in (SamSegmenter(tiny_sam()), SamSegmenter(SamPredictor(tiny_sam()))):
        m = seg.segment(img, (10, 5, 60, 50))
        assert m.shape == (60, 90) and m.dtype == bool


def test_the_proposer_loads_all_three_models_from_settings(dino_dir, tmp_path, monkeypatch):
    import segment_anything

    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam().state_dict(), ckpt)

    def build_tiny(checkpoint=None):
        model = tiny_sam()
        model.load_state_dict(torch.load(checkpoint))
        return model

    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", build_tiny)
    proposer = MaskProposer.from_settings(detector=str(dino_dir), sam_checkpoint=str(ckpt),
                                          sam_model_type="tiny", threshold=0.0)
    assert isinstance(proposer.detector, GroundingDinoDetector)
    assert isinstance(proposer.segmenter, SamSegmenter)
    assert isinstance(proposer.face_detector, FaceDetector)
    img = noise_image(4, (90, 60))
    try:
        p = proposer(img, "hat")
    except MagicFaceInputError as e:  # random SAM weights may segment nothing
        assert "segmented" in str(e)
    else:
        assert p.source == "detector+sam" and p.mask.size == (90, 60)


# -- the library call ------------------------------------------------------------------

def test_concept_mask_auto_uses_the_pipelines_proposer(pipe, small_config):
    """`Concept(mask="auto")`, and no mask while a proposer is set, take the proposal:
    the image equals the one made with that proposal passed as the mask."""
    from magicface_core import Concept

    hat_box = (40, 30, 120, 90)
    proposer = MaskProposer(detector=FakeDetector([(hat_box, 0.9)]),
                            segmenter=FakeSegmenter())
    manual = np.zeros((IMG.height, IMG.width), np.uint8)
    manual[hat_box[1]:hat_box[3], hat_box[0]:hat_box[2]] = 255
    want = pipe.generate("a hat", [Concept(IMG, "hat", mask=Image.fromarray(manual))],
                         small_config)
    pipe.mask_proposer = proposer
    try:
        got = pipe.generate("a hat", [Concept(IMG, "hat", mask="auto")], small_config)
        absent = pipe.generate("a hat", [Concept(IMG, "hat")], small_config)
    finally:
        pipe.mask_proposer = None
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
    assert np.array_equal(np.asarray(absent.image), np.asarray(want.image))
    with pytest.raises(MagicFaceInputError, match="mask='auto' but no mask proposer"):
        pipe.generate("a hat", [Concept(IMG, "hat", mask="auto")], small_config)
    pipe.mask_proposer = MaskProposer(detector=FakeDetector([]))
    try:
        with pytest.raises(MagicFaceInputError, match="no 'hat' found in reference 1"):
            pipe.generate("a hat", [Concept(IMG, "hat", mask="auto")], small_config)
    finally:
        pipe.mask_proposer = None


def test_enable_auto_masks_loads_the_proposer_on_the_pipelines_device(pipe):
    try:
        proposer = pipe.enable_auto_masks(faces=True)
        assert pipe.mask_proposer is proposer
        assert isinstance(proposer.face_detector, FaceDetector) and proposer.detector is None
    finally:
        pipe.mask_proposer = None
