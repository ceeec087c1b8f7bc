"""The command line's checks of its inputs, run before any model is built or loaded (a
typo must not cost a model load): files exist and decode, masks match their images,
words occur in the prompt, numbers are within `limits`, and the output paths can be
written. Imports neither torch nor diffusers."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import MagicFaceInputError
from .limits import LIMITS, TEXT_LIMITS

__all__ = ["word_in_prompt", "check_image_file", "check_concepts", "check_output_path",
           "check_numbers", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def word_in_prompt(word: str, prompt: str) -> bool:
    """The word (or words) stand alone in the prompt, case-insensitively (the
    gateway's rule; the tokenizer's own check follows at sampling)."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    return re.search(pattern, prompt, flags=re.IGNORECASE) is not None


def check_image_file(path: str, what: str) -> tuple[int, int]:
    """The image's displayed size (after its EXIF orientation); MagicFaceInputError
    when it is missing or does not decode."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise MagicFaceInputError(f"{what}: no such file: {path}")
    try:
        with Image.open(p) as img:
            img.load()
            return ImageOps.exif_transpose(img).size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MagicFaceInputError(f"{what}: {path} is not a decodable image ({e})") from None


def check_concepts(prompt: str, specs: list[dict[str, Any]]) -> None:
    """Each concept's files, mask size, word and weight; the count and duplicates."""
    if not prompt.strip():
        raise MagicFaceInputError("--prompt: must not be empty")
    if len(prompt) > TEXT_LIMITS["prompt"]:
        raise MagicFaceInputError(f"--prompt: at most {TEXT_LIMITS['prompt']} characters")
    most = int(LIMITS["concepts"].high)
    if len(specs) > most:
        raise MagicFaceInputError(f"--concept: at most {most} concepts, got {len(specs)}")
    seen: set[str] = set()
    for spec in specs:
        word = spec["word"]
        label = f"--concept {word}"
        if word.lower() in seen:
            raise MagicFaceInputError(f"{label}: the word is used by more than one concept")
        seen.add(word.lower())
        if not word_in_prompt(word, prompt):
            raise MagicFaceInputError(f"{label}: concept word '{word}' does not occur in the "
                                      "prompt")
        if "weight" in spec and (problem := LIMITS["weight"].check("weight", spec["weight"])):
            raise MagicFaceInputError(f"{label}: {problem}")
        size = check_image_file(spec["image"], f"{label} image")
        if spec.get("mask"):
            msize = check_image_file(spec["mask"], f"{label} mask")
            if msize != size:
                raise MagicFaceInputError(
                    f"{label} mask: {msize[0]}x{msize[1]} but its image is "
                    f"{size[0]}x{size[1]}")


def check_numbers(**values: float | None) -> None:
    """Each given value within its limit (`steps=50, width=512, ...`)."""
    for name, value in values.items():
        if value is not None and (problem := LIMITS[name].check(name, value)):
            raise MagicFaceInputError(f"--{name.replace('_', '-')}: {problem}")


def check_output_path(path: Path, option: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
                      create: bool = True) -> None:
    """The path's suffix is an image format and its folder can be written (created
    when missing, with `create`)."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise MagicFaceInputError(f"{option}: {path} must end in one of "
                                  f"{', '.join(suffixes)}")
    folder = path.parent if suffixes else path
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise MagicFaceInputError(f"{option}: folder {folder} does not exist")
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".magicface-write-check")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MagicFaceInputError(f"{option}: cannot write into {folder} "
                                  f"({e.strerror or e})") from None
