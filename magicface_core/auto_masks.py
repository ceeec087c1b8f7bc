"""Mask proposals from the concept word: one mask per reference image, found by text.

For a person word (`PERSON_WORDS`) a face detector is tried first, its box grown to
head and shoulders (the likeness lives there, and faces are found far more reliably
than "a woman"); else, or with no face, a zero-shot text detector (Grounding DINO)
looks for the word. SAM segments the chosen box; without SAM an inscribed ellipse
stands in. Finding nothing is an error naming the word, never a silent whole-image
mask (which would copy the whole reference). Heavy imports happen inside the classes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .errors import MagicFaceInputError
from .masks import load_image, load_sam_predictor
from .rules import normalize_word

__all__ = ["MaskProposal", "Detector", "Segmenter", "FaceFinder", "GroundingDinoDetector",
           "SamSegmenter", "FaceDetector", "MaskProposer", "propose_mask", "PERSON_WORDS",
           "person_word", "is_person_word", "detection_text", "best_detection",
           "pixel_box", "grow_face_box", "soft_ellipse", "ellipse_mask"]

Box = tuple[int, int, int, int]
FloatBox = tuple[float, float, float, float]
Detection = tuple[FloatBox, float]

# Words for which a face is the thing to find. Kept short on purpose: a word missing
# here still works through the text detector, only without the face shortcut.
PERSON_WORDS = frozenset({"man", "woman", "girl", "boy", "person", "people", "face",
                          "child", "lady", "guy", "kid", "baby", "human"})
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "persons": "person"}

# Head and shoulders around a face box: MTCNN's box is forehead to chin and ear to
# ear, so the head's width (hair) and the shoulders need a wider, taller region; the
# shoulders sit about a face-height below the chin.
FACE_WIDTH = 1.6
FACE_ABOVE = 0.6
FACE_BELOW = 1.4


@dataclass(frozen=True)
class MaskProposal:
    """A proposed mask: `mask` ("L", the reference's size, 0/255), the `box` it came
    from (x0, y0, x1, y1 pixel edges, x1/y1 exclusive), the detection's `score` and
    its `source` ("face+sam", "face+ellipse", "detector+sam", "detector+ellipse")."""

    mask: Image.Image
    box: Box
    score: float
    source: str


class Detector(Protocol):
    """Zero-shot detection: boxes (image pixels) and scores in [0, 1] for `text`."""

    def detect(self, image: Image.Image, text: str) -> list[Detection]: ...


class FaceFinder(Protocol):
    """Face detection: boxes (image pixels) and scores in [0, 1]."""

    def detect(self, image: Image.Image) -> list[Detection]: ...


class Segmenter(Protocol):
    """The object in `box`: a bool (H, W) array of the image's size."""

    def segment(self, image: Image.Image, box: Box) -> np.ndarray: ...


def person_word(word: str) -> str:
    """The phrase's head noun (its last word, as in "old man"), lower case, without a
    possessive, and singular when it is a person word: "Women's" -> "woman", "ladies"
    -> "lady", "Kids" -> "kid", "Red Hats" -> "hats". For the `PERSON_WORDS` check."""
    parts = normalize_word(word).split()
    head = re.sub("['\u2019]s?$", "", parts[-1] if parts else "")
    head = _IRREGULAR.get(head, head)
    if head.endswith("ies") and head[:-3] + "y" in PERSON_WORDS:
        return head[:-3] + "y"
    if head.endswith("s") and head[:-1] in PERSON_WORDS:
        return head[:-1]
    return head


def is_person_word(word: str) -> bool:
    return person_word(word) in PERSON_WORDS


def detection_text(word: str, reference_prompt: str | None = None) -> str:
    """Grounding DINO's query: lower case, phrases ending in ".", the word first (the
    detector scores boxes by the first phrase; the reference prompt is context)."""
    phrases = [normalize_word(word).rstrip(" .")]
    if reference_prompt and reference_prompt.strip():
        phrases.append(normalize_word(reference_prompt).rstrip(" ."))
    return " ".join(p + "." for p in phrases)


def clip_box(box: FloatBox, size: tuple[int, int]) -> FloatBox:
    w, h = size
    return tuple(min(max(float(v), 0.0), lim) for v, lim in zip(box, (w, h, w, h),
                                                                strict=True))


def pixel_box(box: FloatBox, size: tuple[int, int]) -> Box | None:
    """The pixels a box touches, clipped to the image; None when nothing is left."""
    x0, y0, x1, y1 = clip_box(box, size)
    out = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
    return out if out[2] > out[0] and out[3] > out[1] else None


def best_detection(detections: list[Detection], threshold: float, size: tuple[int, int],
                   by_area: bool = False) -> tuple[Box, float] | None:
    """The best detection scoring above `threshold` whose box keeps pixels inside the
    image: the highest score, or (`by_area`, for faces, whose scores all sit near 1)
    the largest box, since the reference's subject is its biggest face."""
    kept = []
    for box, score in detections:
        pix = pixel_box(box, size)
        if pix is not None and score > threshold:
            kept.append((pix, float(score)))
    if not kept:
        return None
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b, _ in kept]
    order = [(a, s) if by_area else (s, a) for a, (_, s) in zip(area, kept, strict=True)]
    return kept[order.index(max(order))]


def grow_face_box(box: FloatBox, size: tuple[int, int], width: float = FACE_WIDTH,
                  above: float = FACE_ABOVE, below: float = FACE_BELOW) -> Box:
    """Head and shoulders from a face box: `width` times as wide about its centre,
    from `above` face-heights over its top to `below` under its bottom, clipped."""
    x0, y0, x1, y1 = box
    cx, half, fh = (x0 + x1) / 2, (x1 - x0) * width / 2, y1 - y0
    grown = pixel_box((cx - half, y0 - above * fh, cx + half, y1 + below * fh), size)
    if grown is None:
        raise ValueError(f"face box {box} lies outside the {size[0]}x{size[1]} image")
    return grown


def soft_ellipse(size: tuple[int, int], box: Box, feather: float = 0.1) -> Image.Image:
    """The ellipse inscribed in `box` with a linear edge `feather` of its radii wide,
    grey 128 on the ellipse itself (so binarising at 128 gives the exact ellipse)."""
    w, h = size
    x0, y0, x1, y1 = box
    rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    r = np.sqrt(((xs - (x0 + x1) / 2) / rx) ** 2 + ((ys - (y0 + y1) / 2) / ry) ** 2)
    soft = np.clip(0.5 + (1.0 - r) / max(feather, 1e-6), 0.0, 1.0)
    return Image.fromarray(np.round(soft * 255).astype(np.uint8), "L")


def ellipse_mask(size: tuple[int, int], box: Box) -> Image.Image:
    """The binary (0/255) ellipse inscribed in `box`."""
    return _to_mask(np.asarray(soft_ellipse(size, box)) >= 128)


def _to_mask(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


class GroundingDinoDetector:
    """Grounding DINO (transformers) as a `Detector`."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path_or_id: Any, device: str = "cpu") -> GroundingDinoDetector:
        """From a folder or a hub id such as "IDEA-Research/grounding-dino-tiny"."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        processor = AutoProcessor.from_pretrained(path_or_id)
        model = GroundingDinoForObjectDetection.from_pretrained(path_or_id).to(device)
        return cls(model, processor)

    def detect(self, image: Image.Image, text: str) -> list[Detection]:
        import torch

        device = next(self.model.parameters()).device
        inputs = self.processor(images=image.convert("RGB"), text=text, return_tensors="pt",
                                truncation=True, max_length=self.model.config.max_text_len)
        inputs = inputs.to(device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        # The processor scores a box by its best token anywhere in the text; only the
        # first phrase is sought (the rest is context), so the others are silenced.
        first = self._first_phrase(inputs["input_ids"][0])
        silenced = torch.full_like(outputs.logits, float("-inf"))
        silenced[..., first] = outputs.logits[..., first]
        outputs.logits = silenced
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0,
            target_sizes=[(image.height, image.width)])[0]
        pairs = zip(result["boxes"].tolist(), result["scores"].tolist(), strict=True)
        return [(clip_box(tuple(b), image.size), float(s)) for b, s in pairs]

    def _first_phrase(self, input_ids: Any) -> slice:
        """Token positions of the text's first phrase: after [CLS], up to the first "."
        (or to [SEP] when there is none)."""
        tok = self.processor.tokenizer
        ids = input_ids.tolist()
        ends = {tok.convert_tokens_to_ids("."), tok.sep_token_id}
        stop = next((i for i in range(1, len(ids)) if ids[i] in ends), len(ids))
        return slice(1, max(stop, 2))


class SamSegmenter:
    """segment-anything as a `Segmenter`: the best of SAM's three masks for a box."""

    def __init__(self, sam_or_predictor: Any) -> None:
        if hasattr(sam_or_predictor, "set_image"):
            self.predictor = sam_or_predictor
        else:
            from segment_anything import SamPredictor

            self.predictor = SamPredictor(sam_or_predictor.eval())

    @classmethod
    def from_checkpoint(cls, path: str, model_type: str = "vit_b",
                        device: str = "cpu") -> SamSegmenter:
        return cls(load_sam_predictor(path, model_type, device))

    def segment(self, image: Image.Image, box: Box) -> np.ndarray:
        import torch

        # Three candidates (whole, part, subpart) and SAM's own quality estimate beat
        # the single mask on a loose box such as a grown face box.
        with torch.inference_mode():
            self.predictor.set_image(np.asarray(image.convert("RGB")))
            masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32),
                                                      multimask_output=True)
        return np.asarray(masks[int(np.argmax(scores))], dtype=bool)


class FaceDetector:
    """facenet-pytorch's MTCNN (its weights ship with the package) as a `FaceFinder`."""

    def __init__(self, device: str = "cpu", mtcnn: Any = None) -> None:
        if mtcnn is None:
            from facenet_pytorch import MTCNN

            mtcnn = MTCNN(keep_all=True, device=device)
        self.mtcnn = mtcnn

    def detect(self, image: Image.Image) -> list[Detection]:
        boxes, probs = self.mtcnn.detect(image.convert("RGB"))
        if boxes is None:
            return []
        return [(clip_box(tuple(b), image.size), float(p))
                for b, p in zip(boxes.tolist(), probs.tolist(), strict=True)]


def _where(index: int | None) -> str:
    return "the reference" if index is None else f"reference {index + 1}"


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise MagicFaceInputError(f"threshold must be a finite number, got {threshold!r}")
    return float(threshold)


def _find(image: Image.Image, word: str, detector: Detector | None,
          face_detector: FaceFinder | None, threshold: float,
          reference_prompt: str | None) -> tuple[Box, float, str] | list[str]:
    """(box, score, "face"|"detector"), or what was tried when nothing was found."""
    tried = []
    if face_detector is not None and is_person_word(word):
        tried.append("a face detector")
        face = best_detection(face_detector.detect(image), threshold, image.size,
                              by_area=True)
        if face is not None:
            return grow_face_box(face[0], image.size), face[1], "face"
    if detector is not None:
        tried.append("a text detector")
        found = best_detection(detector.detect(image, detection_text(word, reference_prompt)),
                               threshold, image.size)
        if found is not None:
            return found[0], found[1], "detector"
    return tried


def propose_mask(image: Any, word: str, *, detector: Detector | None = None,
                 segmenter: Segmenter | None = None, face_detector: FaceFinder | None = None,
                 threshold: float = 0.3, reference_prompt: str | None = None,
                 index: int | None = None) -> MaskProposal:
    """A mask for `word` in `image` (anything `load_image` takes); `index` (0-based)
    names the reference in errors. Raises MagicFaceInputError when nothing scores
    above `threshold`."""
    threshold = _check_threshold(threshold)
    if not isinstance(word, str) or not word.strip():
        raise MagicFaceInputError(f"word of {_where(index)} must be a non-empty string")
    img = load_image(image, f"{_where(index)} image").convert("RGB")
    found = _find(img, word, detector, face_detector, threshold, reference_prompt)
    if isinstance(found, list):
        how = (f"looked with {' and '.join(found)}, threshold {threshold:g}" if found
               else "no detector was given")
        raise MagicFaceInputError(f"no '{word}' found in {_where(index)} ({how}); "
                                  "pass a mask or a box")
    box, score, kind = found
    if segmenter is None:
        return MaskProposal(ellipse_mask(img.size, box), box, score, f"{kind}+ellipse")
    mask = np.asarray(segmenter.segment(img, box), dtype=bool)
    if mask.shape != (img.height, img.width):
        raise ValueError(f"the segmenter gave a {mask.shape} mask for a "
                         f"{img.width}x{img.height} image")
    if not mask.any():
        raise MagicFaceInputError(f"no '{word}' segmented in {_where(index)} (its box "
                                  f"{box} gave an empty mask); pass a mask or a box")
    return MaskProposal(_to_mask(mask), box, score, f"{kind}+sam")


class MaskProposer:
    """`propose_mask` with its models loaded once, for many references."""

    def __init__(self, detector: Detector | None = None, segmenter: Segmenter | None = None,
                 face_detector: FaceFinder | None = None, threshold: float = 0.3) -> None:
        self.detector = detector
        self.segmenter = segmenter
        self.face_detector = face_detector
        self.threshold = _check_threshold(threshold)

    @classmethod
    def from_settings(cls, detector: str | None = None, sam_checkpoint: str | None = None,
                      sam_model_type: str = "vit_b", faces: bool = True,
                      device: str = "cpu", threshold: float = 0.3) -> MaskProposer:
        """`detector`: a Grounding DINO folder or hub id (None: no text detection);
        `sam_checkpoint`: a SAM checkpoint file (None: ellipses); `faces`: MTCNN for
        person words."""
        threshold = _check_threshold(threshold)  # before minutes of loading
        dino = GroundingDinoDetector.from_pretrained(detector, device) if detector else None
        sam = (SamSegmenter.from_checkpoint(sam_checkpoint, sam_model_type, device)
               if sam_checkpoint else None)
        return cls(dino, sam, FaceDetector(device) if faces else None, threshold)

    def __call__(self, image: Any, word: str, *, reference_prompt: str | None = None,
                 index: int | None = None) -> MaskProposal:
        return propose_mask(image, word, detector=self.detector, segmenter=self.segmenter,
                            face_detector=self.face_detector, threshold=self.threshold,
                            reference_prompt=reference_prompt, index=index)
