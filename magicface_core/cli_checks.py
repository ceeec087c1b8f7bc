"""The command line's checks of its inputs, run before any model is built or loaded (a
typo must not cost a model load): the `--concept` specs, files exist and decode, masks
match their images, words occur in the prompt, numbers are within `limits`, the output
paths can be written, and the model can be had (a local folder, the Hugging Face cache,
or a reachable hub).

Imports neither torch nor diffusers (PIL, numpy and, for the model's whereabouts,
huggingface_hub): a mistake is reported in well under a second. Every problem is a
`MagicFaceInputError` whose message names the option, concept or field.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import MagicFaceInputError
from .limits import IMAGE_LIMITS, LIMITS, TEXT_LIMITS
from .rules import concept_problems, prompt_problems, word_in_prompt

__all__ = ["parse_concept", "CONCEPT_KEYS", "CONCEPT_KEY_ALIASES", "IMAGE_SUFFIXES",
           "word_in_prompt", "check_limit", "check_text", "check_prompt", "check_concepts",
           "check_image_file", "check_image_output", "check_writable_folder",
           "check_sam_checkpoint", "ModelSource", "ModelUnavailable", "locate_model",
           "offline_hint", "hub_reachable", "cached_snapshot"]

# The keys of a `--concept` spec after `word=IMAGE`, named as the library's Concept
# fields; `ref` is the old short name of `reference_prompt`, kept for old command lines.
CONCEPT_KEYS = ("mask", "weight", "reference_prompt", "box")
CONCEPT_KEY_ALIASES = {"ref": "reference_prompt"}

# The formats the gateway accepts too.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# A word-like `key=` at the start of a piece: it starts a new field, so an unknown one
# is an error rather than text glued onto the previous value (a file name).
_KEY_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=")


def _fail(message: str) -> MagicFaceInputError:
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
            raise _fail(f"--concept {spec!r}: unknown key {m.group(1)!r} (valid keys: {valid})")
        pieces.append(part)
    head, *rest = pieces
    if "=" not in head:
        raise _fail(f"--concept {spec!r}: expected word=IMAGE first")
    word, image = (s.strip().strip("\"'") for s in head.split("=", 1))
    if not word or not image:
        raise _fail(f"--concept {spec!r}: expected word=IMAGE first")
    out: dict = {"word": word, "image": image}
    for part in rest:
        key, value = (s.strip() for s in part.split("=", 1))
        key = CONCEPT_KEY_ALIASES.get(key, key)
        if key in out:
            raise _fail(f"--concept {spec!r}: {key} is given twice")
        value = value.strip("\"'") if key != "box" else value
        if key == "weight":
            try:
                out["weight"] = float(value)
            except ValueError:
                raise _fail(f"--concept {spec!r}: weight must be a number, got {value!r}") \
                    from None
        elif key == "box":
            try:
                box = tuple(float(x) for x in value.split(":"))
            except ValueError:
                raise _fail(f"--concept {spec!r}: box must be x0:y0:x1:y1") from None
            if len(box) != 4:
                raise _fail(f"--concept {spec!r}: box must be x0:y0:x1:y1")
            out["box"] = box
        elif key == "mask" and not value:
            raise _fail(f"--concept {spec!r}: mask is empty")
        else:
            out[key] = value
    return out


# -- values -----------------------------------------------------------------------------

def check_limit(name: str, value: Any, label: str) -> None:
    """`value` within LIMITS[name] (the table the library and the gateway read); the
    message names `label` (an option or a field)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{label} must be a number, got {value!r}")
    lim = LIMITS[name]
    if (lim.multiple_of or name in ("steps", "seed")) and not float(value).is_integer():
        raise _fail(f"{label} must be an integer, got {value!r}")
    problem = lim.check(label, value)
    if problem:
        raise _fail(problem)


def check_text(name: str, value: Any, label: str) -> None:
    """A string of at most TEXT_LIMITS[name] characters."""
    if not isinstance(value, str):
        raise _fail(f"{label} must be a string, got {type(value).__name__}")
    most = TEXT_LIMITS[name]
    if len(value) > most:
        raise _fail(f"{label} must be at most {most} characters, got {len(value)}")


def check_prompt(prompt: Any, label: str = "--prompt") -> None:
    problems = prompt_problems(prompt)
    if problems:
        raise _fail(problems[0].text(label))


# -- files ------------------------------------------------------------------------------

def check_image_file(path: Any, label: str) -> tuple[int, int]:
    """The image's size as the library sees it (decoded in full by the library's own
    `load_image`, EXIF orientation applied); an error naming `label` when the file is
    missing or does not decode."""
    from .masks import load_image  # PIL and numpy only

    if not isinstance(path, (str, Path)) or not str(path):
        raise _fail(f"{label}: expected a file path, got {path!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise _fail(f"{label}: no such file: {path}")
    if not p.is_file():
        raise _fail(f"{label}: not a file: {path}")
    _check_pixels(p, label)
    try:
        return load_image(p, label).size
    except MagicFaceInputError as e:
        raise _fail(f"{e} ({path} is not a decodable image)") from None


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
        raise _fail(f"{label}: {w}x{h} exceeds the {most}-pixel limit ({path})")


def check_sam_checkpoint(path: str | None, label: str = "--sam-checkpoint") -> None:
    if path is not None and not Path(path).expanduser().is_file():
        raise _fail(f"{label}: no such file: {path}")


def _check_box(box: Any, size: tuple[int, int], label: str) -> None:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in box):
        raise _fail(f"{label}: must be four numbers x0, y0, x1, y1")
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise _fail(f"{label}: must have x1 > x0 and y1 > y0, got {tuple(box)}")
    if x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]:
        raise _fail(f"{label}: {tuple(box)} lies outside the {size[0]}x{size[1]} image")


def check_concepts(prompt: str, concepts: Sequence[dict], label: Callable[[int, str], str],
                   sam_checkpoint: str | None = None) -> None:
    """Every concept (a dict of Concept's fields, `image`/`mask` as file paths) against
    the prompt, the limits and its files. `label(i, field)` names concept i's field in
    the messages (field "" for the concept as a whole; i = -1 for the list)."""
    # The text fields by the rule book (the library's and the gateway's), then files.
    # No concept: plain Stable Diffusion, as the library allows.
    problems = concept_problems(prompt, concepts, least=0, field=label)
    if problems:
        first = problems[0]
        raise _fail(first.text(label(-1, "") if first.index is None else None))
    for i, c in enumerate(concepts):
        size = check_image_file(c.get("image"), label(i, "image"))
        if c.get("box") is not None:
            _check_box(c["box"], size, label(i, "box"))
        if c.get("mask") is not None:
            mask_size = check_image_file(c["mask"], label(i, "mask"))
            if mask_size != size:
                raise _fail(f"{label(i, 'mask')}: the mask is {mask_size[0]}x{mask_size[1]} "
                            f"but its image is {size[0]}x{size[1]} (after EXIF orientation)")
        elif sam_checkpoint is None:
            raise _fail(f"{label(i, 'mask')}: no mask, and no --sam-checkpoint to make one")


def _probe_writable(folder: Path, label: str) -> None:
    # Permission bits mislead (root, ACLs, read-only mounts): making a file is the test.
    try:
        fd, name = tempfile.mkstemp(prefix=".magicface-write-check-", dir=folder)
    except OSError as e:
        raise _fail(f"{label}: cannot write into {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def check_image_output(path: Path, label: str) -> None:
    """An image to write: a PNG, JPEG or WebP name, in a folder that exists (a typo in
    a folder name must not silently make a new tree) and can be written."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise _fail(f"{label}: {path} must end in one of {', '.join(IMAGE_SUFFIXES)} "
                    "(PNG, JPEG or WebP)")
    p = path.expanduser()
    if p.is_dir():
        raise _fail(f"{label}: {path} is a folder, not a file name")
    if not p.parent.is_dir():
        raise _fail(f"{label}: the folder {p.parent} does not exist")
    _probe_writable(p.parent, label)


def check_writable_folder(path: Path, label: str) -> None:
    """A results folder, made on use: it, or the nearest parent that exists (where it
    will be made), must be a folder that can be written."""
    p = path.expanduser()
    if p.exists() and not p.is_dir():
        raise _fail(f"{label}: {path} exists and is not a folder")
    existing = p.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise _fail(f"{label}: {existing} is not a folder")
    _probe_writable(existing, label)


# -- the model --------------------------------------------------------------------------

# The five components models.load_components reads (it never reads model_index.json, so
# a model our loader downloaded has only these in the cache).
_COMPONENT_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                    "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DEFAULT_ENDPOINT = "https://huggingface.co"
# A reachable hub accepts a TCP connection well within this; an unreachable one is what
# the hub client would otherwise retry for about 30 s before failing.
PROBE_TIMEOUT_S = 3.0


class ModelUnavailable(MagicFaceInputError):
    """The model cannot be had here: not in the cache while the hub is off or
    unreachable, or its download failed. The message is the offline hint."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it: "tiny", a folder or a hub id (what reports show)
    path: str  # what to load: "tiny", a local folder (maybe a cached snapshot), or the id
    download: bool  # True: loading goes to the hub


def offline_hint(model: str, why: str) -> str:
    return (f"--model {model}: {why}; use --tiny (random weights, no download) or "
            "--model /path/to/local/diffusers/folder (with HF_HUB_OFFLINE=1, hub ids load "
            "from the local Hugging Face cache only)")


def _hub_offline() -> bool:
    # The hub client's own rule for the variable; read here, not from
    # huggingface_hub.constants, which froze it when first imported.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of `repo_id` when every component's config is in the
    Hugging Face cache (missing weights surface in the load itself)."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in _COMPONENT_FILES:
        try:
            got = try_to_load_from_cache(repo_id, name)
        except Exception:  # an id the cache cannot hold, a broken cache: not cached
            return None
        if not isinstance(got, str):
            return None
        found.append(Path(got))
    return str(found[0].parents[1])


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host (HF_ENDPOINT) accepts a TCP connection within `timeout`.
    Behind a proxy a direct connection proves nothing: then say yes and let the hub
    client try."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                       "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def locate_model(model: str, tiny: bool = False) -> ModelSource:
    """Where the model will load from, decided before anything loads: a local folder
    must hold the five components; a hub id loads from the cache when it is there, and
    from the hub only when downloads are allowed and the hub answers."""
    if tiny:
        return ModelSource("tiny", "tiny", False)
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise _fail(f"--model {model}: not a folder (give a diffusers folder or a hub id)")
        missing = [f.split("/")[0] for f in _COMPONENT_FILES if not (local / f).is_file()]
        if missing:
            raise _fail(f"--model {model}: not a diffusers Stable Diffusion folder (no "
                        f"{', '.join(missing)})")
        return ModelSource(model, str(local), False)
    if model.startswith((".", "/", "~", "\\")) or not _REPO_ID.match(model):
        raise _fail(f"--model {model}: no such folder, and not a hub id (org/name)")
    snapshot = cached_snapshot(model)
    if snapshot is not None:
        return ModelSource(model, snapshot, False)
    if _hub_offline():
        raise ModelUnavailable(offline_hint(
            model, "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"))
    endpoint = os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT
    if not hub_reachable():
        raise ModelUnavailable(offline_hint(
            model, f"not in the local Hugging Face cache, and {endpoint} cannot be reached"))
    return ModelSource(model, model, True)
