"""The command line's checks of its inputs, run before any model is built or loaded (a
typo must not cost a model load): the `--concept` specs, files exist and decode, masks
match their images, words occur in the prompt, numbers are within `limits`, and the
output paths can be written. Where the model comes from is `model_source`'s.

The prompt's and the concepts' words, weights and count are the rule book's
(`magicface_core.rules`), the numbers the limits table's (`magicface_core.limits`):
this module only renders their problems with the option's name. Imports neither torch
nor diffusers (PIL and numpy): a mistake is reported in well under a second. Every
problem is a `MagicFaceInputError` whose message names the option, concept or field.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from magicface_core.errors import MagicFaceInputError
from magicface_core.limits import IMAGE_LIMITS, LIMITS, TEXT_LIMITS
from magicface_core.rules import concept_problems, prompt_problems, word_in_prompt

__all__ = ["parse_concept", "CONCEPT_KEYS", "CONCEPT_KEY_ALIASES", "IMAGE_SUFFIXES",
           "word_in_prompt", "check_limit", "check_text", "check_prompt", "check_concepts",
           "check_image_file", "check_image_output", "check_writable_folder",
           "check_sam_checkpoint", "check_options", "fail"]

# The keys of a `--concept` spec after `word=IMAGE`, named as the library's Concept
# fields; `ref` is the old short name of `reference_prompt`, kept for old command lines.
CONCEPT_KEYS = ("mask", "weight", "reference_prompt", "box")
CONCEPT_KEY_ALIASES = {"ref": "reference_prompt"}

# The formats the gateway accepts too.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# A word-like `key=` at the start of a piece: it starts a new field, so an unknown one
# is an error rather than text glued onto the previous value (a file name).
_KEY_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=")


def fail(message: str) -> MagicFaceInputError:
    # One line on stderr: a newline inside a user's value must not break it.
    return MagicFaceInputError(" ".join(message.splitlines()))


# -- --concept specs --------------------------------------------------------------------

def _split_spec(spec: str) -> list[str]:
    """Split on the commas outside quotes (the quotes stay; values strip them)."""
    parts: list[str] = []
    cur: list[str] = []
    quote = ""
    for ch in spec:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_concept(spec: str) -> dict:
    """`word=IMAGE[,mask=MASK][,weight=W][,reference_prompt=TEXT][,box=x0:y0:x1:y1]`
    -> Concept's fields (`ref=` is short for `reference_prompt=`).

    A comma inside the reference prompt is kept: a piece without `key=` belongs to the
    value before it (`ref=a man, with a hat`); quote the text to keep a `word=` in it.
    An unknown key is an error listing the valid ones (a typo like `masks=` must not
    become part of a file name or of the prompt text).
    """
    valid = ", ".join([*CONCEPT_KEYS, *(f"{a} (= {k})" for a, k in CONCEPT_KEY_ALIASES.items())])
    pieces: list[str] = []
    for part in _split_spec(spec):
        m = _KEY_RE.match(part)
        if pieces and m is None:
            pieces[-1] += "," + part
            continue
        if pieces and m.group(1) not in CONCEPT_KEYS and m.group(1) not in CONCEPT_KEY_ALIASES:
            raise fail(f"--concept {spec!r}: unknown key {m.group(1)!r} (valid keys: {valid})")
        pieces.append(part)
    head, *rest = pieces
    if "=" not in head:
        raise fail(f"--concept {spec!r}: expected word=IMAGE first")
    word, image = (s.strip().strip("\"'") for s in head.split("=", 1))
    if not word or not image:
        raise fail(f"--concept {spec!r}: expected word=IMAGE first")
    out: dict = {"word": word, "image": image}
    for part in rest:
        key, value = (s.strip() for s in part.split("=", 1))
        key = CONCEPT_KEY_ALIASES.get(key, key)
        if key in out:
            raise fail(f"--concept {spec!r}: {key} is given twice")
        value = value.strip("\"'") if key != "box" else value
        if key == "weight":
            try:
                out["weight"] = float(value)
            except ValueError:
                raise fail(f"--concept {spec!r}: weight must be a number, got {value!r}") \
                    from None
        elif key == "box":
            try:
                box = tuple(float(x) for x in value.split(":"))
            except ValueError:
                raise fail(f"--concept {spec!r}: box must be x0:y0:x1:y1") from None
            if len(box) != 4:
                raise fail(f"--concept {spec!r}: box must be x0:y0:x1:y1")
            out["box"] = box
        elif key == "mask" and not value:
            raise fail(f"--concept {spec!r}: mask is empty")
        else:
            out[key] = value
    return out


# -- values -----------------------------------------------------------------------------

def check_limit(name: str, value: Any, label: str) -> None:
    """`value` within LIMITS[name] (the table the library and the gateway read); the
    message names `label` (an option or a field)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"{label} must be a number, got {value!r}")
    lim = LIMITS[name]
    if (lim.multiple_of or name in ("steps", "seed")) and not float(value).is_integer():
        raise fail(f"{label} must be an integer, got {value!r}")
    problem = lim.check(label, value)
    if problem:
        raise fail(problem)


def check_text(name: str, value: Any, label: str) -> None:
    """A string of at most TEXT_LIMITS[name] characters."""
    if not isinstance(value, str):
        raise fail(f"{label} must be a string, got {type(value).__name__}")
    most = TEXT_LIMITS[name]
    if len(value) > most:
        raise fail(f"{label} must be at most {most} characters, got {len(value)}")


def check_prompt(prompt: Any, label: str = "--prompt") -> None:
    problems = prompt_problems(prompt)
    if problems:
        raise fail(problems[0].text(label))


# -- files ------------------------------------------------------------------------------

def check_image_file(path: Any, label: str) -> tuple[int, int]:
    """The image's size as the library sees it (decoded in full by the library's own
    `load_image`, EXIF orientation applied); an error naming `label` when the file is
    missing or does not decode."""
    from magicface_core.masks import load_image  # PIL and numpy only

    if not isinstance(path, (str, Path)) or not str(path):
        raise fail(f"{label}: expected a file path, got {path!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise fail(f"{label}: no such file: {path}")
    if not p.is_file():
        raise fail(f"{label}: not a file: {path}")
    _check_pixels(p, label)
    try:
        return load_image(p, label).size
    except MagicFaceInputError as e:
        raise fail(f"{e} ({path} is not a decodable image)") from None


def _check_pixels(path: Path, label: str) -> None:
    """The gateway's pixel limit, read from the header before anything is decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - not an image: the decode below says so
        return
    most = IMAGE_LIMITS["pixels"]
    if w * h > most:
        raise fail(f"{label}: {w}x{h} exceeds the {most}-pixel limit ({path})")


def check_sam_checkpoint(path: str | None, label: str = "--sam-checkpoint") -> None:
    if path is not None and not Path(path).expanduser().is_file():
        raise fail(f"{label}: no such file: {path}")


def _check_box(box: Any, size: tuple[int, int], label: str) -> None:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in box):
        raise fail(f"{label}: must be four numbers x0, y0, x1, y1")
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise fail(f"{label}: must have x1 > x0 and y1 > y0, got {tuple(box)}")
    if x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]:
        raise fail(f"{label}: {tuple(box)} lies outside the {size[0]}x{size[1]} image")


def check_concepts(prompt: str, concepts: Sequence[dict], label: Callable[[int, str], str],
                   sam_checkpoint: str | None = None, auto_masks: bool = False) -> None:
    """Every concept (a dict of Concept's fields, `image`/`mask` as file paths) against
    the prompt, the limits and its files. `label(i, field)` names concept i's field in
    the messages (field "" for the concept as a whole; i = -1 for the list).
    `auto_masks`: a proposer is configured, so `mask=auto` may be asked for."""
    # The text fields by the rule book (the library's and the gateway's), then files.
    # No concept: plain Stable Diffusion, as the library allows.
    problems = concept_problems(prompt, concepts, least=0, field=label)
    if problems:
        first = problems[0]
        raise fail(first.text(label(-1, "") if first.index is None else None))
    for i, c in enumerate(concepts):
        size = check_image_file(c.get("image"), label(i, "image"))
        if c.get("box") is not None:
            _check_box(c["box"], size, label(i, "box"))
        if c.get("mask") == "auto":
            if not auto_masks:
                raise fail(f"{label(i, 'mask')}: mask=auto needs --mask-detector or "
                           "--mask-faces")
        elif c.get("mask") is not None:
            mask_size = check_image_file(c["mask"], label(i, "mask"))
            if mask_size != size:
                raise fail(f"{label(i, 'mask')}: the mask is {mask_size[0]}x{mask_size[1]} "
                            f"but its image is {size[0]}x{size[1]} (after EXIF orientation)")
        elif sam_checkpoint is None:
            raise fail(f"{label(i, 'mask')}: no mask, and no --sam-checkpoint to make one")


def _probe_writable(folder: Path, label: str) -> None:
    # Permission bits mislead (root, ACLs, read-only mounts): making a file is the test.
    try:
        fd, name = tempfile.mkstemp(prefix=".magicface-write-check-", dir=folder)
    except OSError as e:
        raise fail(f"{label}: cannot write into {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def check_image_output(path: Path, label: str) -> None:
    """An image to write: a PNG, JPEG or WebP name, in a folder that exists (a typo in
    a folder name must not silently make a new tree) and can be written."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise fail(f"{label}: {path} must end in one of {', '.join(IMAGE_SUFFIXES)} "
                    "(PNG, JPEG or WebP)")
    p = path.expanduser()
    if p.is_dir():
        raise fail(f"{label}: {path} is a folder, not a file name")
    if not p.parent.is_dir():
        raise fail(f"{label}: the folder {p.parent} does not exist")
    _probe_writable(p.parent, label)


def check_writable_folder(path: Path, label: str) -> None:
    """A results folder, made on use: it, or the nearest parent that exists (where it
    will be made), must be a folder that can be written."""
    p = path.expanduser()
    if p.exists() and not p.is_dir():
        raise fail(f"{label}: {path} exists and is not a folder")
    existing = p.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise fail(f"{label}: {existing} is not a folder")
    _probe_writable(existing, label)


# -- the sampling options of generate and run -------------------------------------------

def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(args: argparse.Namespace) -> None:
    """The sampling numbers against the limits table, the texts, the SAM checkpoint and
    --save-maps-every: all without a model."""
    for name in ("steps", "guidance_scale", "alpha", "seed", "height", "width", "ca_scale"):
        value = getattr(args, name)
        if value is not None:
            check_limit(name, value, _option(name))
    if args.negative_prompt is not None:
        check_text("negative_prompt", args.negative_prompt, "--negative-prompt")
    check_sam_checkpoint(args.sam_checkpoint)
    if args.save_maps_every is not None:
        if args.save_maps_every < 1:
            raise MagicFaceInputError(f"--save-maps-every must be at least 1, got "
                                      f"{args.save_maps_every}")
        if not args.save_maps:
            raise MagicFaceInputError("--save-maps-every needs --save-maps")
