"""Many examples with one model load (`magicface run`): finding example.json files and
.jsonl manifests, reading and checking every example before any model loads, and
writing the results folder that `magicface eval` reads (plus a summary).

An example (an example.json, or one line of a manifest) is
`{"prompt", "concepts": [{"word", "image", "mask"?, "weight"?, "reference_prompt"?,
"box"?, "face"?}], "seed"?, "name"?, ...}` with paths relative to its file. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magicface_core.config import Concept, GenerationConfig
from magicface_core.errors import MagicFaceInputError

from .checks import check_concepts, check_limit, check_prompt

__all__ = ["Example", "find_examples", "read_example", "read_manifest", "load_examples",
           "run_examples", "RESULTS_FILE", "SUMMARY_FILE", "EXAMPLE_CONCEPT_KEYS"]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"

# A concept's keys in an example; anything else is a typo (`masks`) that would silently
# drop a field. `face` marks the identity reference for `magicface eval`.
EXAMPLE_CONCEPT_KEYS = ("word", "image", "mask", "weight", "reference_prompt", "box", "face")
# A name becomes `<name>.png` in the results folder: no separators, no leading dot.
_NAME_RE = re.compile(r"^[^/\\.][^/\\]*$")


@dataclass
class Example:
    name: str  # the folder's name, the file's stem or the line's `name`: the image's name
    path: Path  # the example.json or the manifest
    prompt: str
    concepts: list[Concept]
    data: dict  # the object as read (its concepts' paths relative to `path`'s folder)
    line: int | None = None  # the manifest line (1-based); None for an example.json

    @property
    def seed(self) -> int:
        return int(self.data.get("seed", 0))

    @property
    def where(self) -> str:
        """The file (and line) in messages."""
        return str(self.path) if self.line is None else f"{self.path} line {self.line}"


def find_examples(inputs: Sequence[Path]) -> list[Path]:
    """example.json files and .jsonl manifests named by `inputs` (files, folders holding
    an example.json, or folders of such folders), in order, each once."""
    found: list[Path] = []
    for p in inputs:
        if p.is_file():
            found.append(p)
        elif (p / "example.json").is_file():
            found.append(p / "example.json")
        elif p.is_dir():
            inner = sorted(p.glob("*/example.json"))
            if not inner:
                raise MagicFaceInputError(f"{p}: no example.json in it or in its subfolders")
            found.extend(inner)
        else:
            raise MagicFaceInputError(f"{p}: no such file or folder")
    out, seen = [], set()
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def _check_fields(data: Any, where: str) -> None:
    """The shape of an example object, before its values are checked."""
    if not isinstance(data, dict):
        raise MagicFaceInputError(f"{where}: must be a JSON object (an example), got "
                                  f"{type(data).__name__}")
    if "prompt" not in data:
        raise MagicFaceInputError(f"{where}: prompt: missing")
    check_prompt(data["prompt"], f"{where}: prompt")
    concepts = data.get("concepts")
    if not isinstance(concepts, list):
        raise MagicFaceInputError(f"{where}: concepts: must be a list of objects")
    for i, c in enumerate(concepts):
        field = f"{where}: concepts[{i}]"
        if not isinstance(c, dict):
            raise MagicFaceInputError(f"{field}: must be an object")
        unknown = sorted(set(c) - set(EXAMPLE_CONCEPT_KEYS))
        if unknown:
            raise MagicFaceInputError(f"{field}: unknown key {unknown[0]!r} (valid keys: "
                                      f"{', '.join(EXAMPLE_CONCEPT_KEYS)})")
        for key in ("image", "mask"):
            if key in c and c[key] is not None and not (isinstance(c[key], str) and c[key]):
                raise MagicFaceInputError(f"{field}.{key}: must be a file path")
        if "image" not in c:
            raise MagicFaceInputError(f"{field}.image: missing")
        if "face" in c and not isinstance(c["face"], bool):
            raise MagicFaceInputError(f"{field}.face: must be true or false")
    if "seed" in data:
        check_limit("seed", data["seed"], f"{where}: seed")


def read_example(path: Path, data: dict | None = None, name: str | None = None,
                 line: int | None = None, sam_checkpoint: str | None = None) -> Example:
    """An example.json (or, with `data`, one line of a manifest at `path`), every field
    checked (files, decoding, mask sizes, words, limits); errors name the file, the
    line and the field."""
    where = str(path) if line is None else f"{path} line {line}"
    if data is None:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MagicFaceInputError(f"{where}: not an example.json (not JSON: {e})") from None
        except OSError as e:
            raise MagicFaceInputError(f"{where}: cannot read it ({e.strerror or e})") from None
    _check_fields(data, where)
    base = path.parent
    # Concept fields with the files resolved against the example's folder.
    specs = [{k: (str(base / v) if k in ("image", "mask") and v is not None else v)
              for k, v in c.items() if k != "face"} for c in data["concepts"]]
    for s in specs:
        if isinstance(s.get("box"), list):
            s["box"] = tuple(s["box"])
    check_concepts(data["prompt"], specs,
                   lambda i, field: f"{where}: concepts" + (f"[{i}]" if i >= 0 else "")
                   + (f".{field}" if field else ""),
                   sam_checkpoint)
    try:
        concepts = [Concept(**s) for s in specs]
    except (MagicFaceInputError, TypeError) as e:
        raise MagicFaceInputError(f"{where}: concepts: {e}") from None
    if name is None:
        name = path.parent.name if path.name == "example.json" else path.stem
    if not _NAME_RE.match(name):
        raise MagicFaceInputError(f"{where}: name: {name!r} cannot name a file (no '/', "
                                  "'\\' or leading '.')")
    return Example(name, path, data["prompt"], concepts, data, line)


def read_manifest(path: Path, sam_checkpoint: str | None = None) -> list[Example]:
    """A .jsonl manifest: one example object per line (blank lines skipped); a line's
    `name` names its image, else `<manifest stem>-<line>`."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MagicFaceInputError(f"{path}: cannot read the manifest ({e})") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MagicFaceInputError(f"{path} line {n}: not JSON ({e.msg})") from None
        name = data.get("name") if isinstance(data, dict) else None
        if name is not None and not isinstance(name, str):
            raise MagicFaceInputError(f"{path} line {n}: name: must be a string")
        out.append(read_example(path, data, name or f"{path.stem}-{n}", n, sam_checkpoint))
    if not out:
        raise MagicFaceInputError(f"{path}: no examples in the manifest")
    return out


def load_examples(inputs: Sequence[Path], sam_checkpoint: str | None = None) -> list[Example]:
    """Every example named by `inputs` (example.json files, folders, .jsonl manifests),
    read and checked before any model loads."""
    examples: list[Example] = []
    for p in find_examples(inputs):
        if p.suffix == ".jsonl":
            examples.extend(read_manifest(p, sam_checkpoint))
        else:
            examples.append(read_example(p, sam_checkpoint=sam_checkpoint))
    first: dict[str, Example] = {}
    for ex in examples:
        if ex.name in first:
            raise MagicFaceInputError(f"{ex.where}: name: '{ex.name}' is also the name of "
                                      f"{first[ex.name].where} (both would write "
                                      f"{ex.name}.png)")
        first[ex.name] = ex
    return examples


def _result_line(ex: Example, config: GenerationConfig, seconds: float, out: Path) -> dict:
    def rel(p: str) -> str:
        return os.path.relpath(ex.path.parent / p, out)

    return {
        "name": ex.name, "image": f"{ex.name}.png", "prompt": ex.prompt,
        "example": rel(ex.path.name), **({"line": ex.line} if ex.line is not None else {}),
        "concepts": [{"word": c["word"], "image": rel(c["image"]),
                      **({"mask": rel(c["mask"])} if c.get("mask") else {}),
                      **({"face": c["face"]} if "face" in c else {})}
                     for c in ex.data["concepts"]],
        "seed": config.seed, "preset": config.preset, "seconds": round(seconds, 3),
    }


def run_examples(generate: Callable[[Example, GenerationConfig], Any],
                 examples: Sequence[Example],
                 config_of: Callable[[Example], GenerationConfig], out: Path,
                 log: Callable[[str], None] = print, model: str | None = None,
                 preset: str | None = None, load_seconds: float | None = None,
                 on_result: Callable[[Example, Any], dict] | None = None) -> dict:
    """`generate(example, config)` (a result with `.image`) for each example; writes
    `<name>.png`, RESULTS_FILE (one JSON line per image, paths relative to `out`,
    appended as each image is done) and SUMMARY_FILE; returns the summary.
    `on_result(example, result)` may write more files and returns fields for its line.
    An example that fails is logged and counted, and the others go on."""
    out.mkdir(parents=True, exist_ok=True)
    failures: list[dict] = []
    per_image: dict[str, float] = {}
    started_all = time.perf_counter()
    with open(out / RESULTS_FILE, "w") as results:
        for i, ex in enumerate(examples, 1):
            log(f"[{i}/{len(examples)}] {ex.name}: {ex.prompt}")
            config = config_of(ex)
            started = time.perf_counter()
            try:
                res = generate(ex, config)
                res.image.save(out / f"{ex.name}.png")
                extra = on_result(ex, res) if on_result is not None else {}
            except Exception as e:  # one bad example must not cost the rest of the run
                error = f"{type(e).__name__}: {e}"
                log(f"  {ex.name} failed: {error}")
                if not isinstance(e, MagicFaceInputError):
                    log(traceback.format_exc().rstrip())
                failures.append({"name": ex.name, "example": ex.where, "error": error})
                continue
            seconds = time.perf_counter() - started
            per_image[ex.name] = round(seconds, 3)
            results.write(json.dumps({**_result_line(ex, config, seconds, out), **extra}) + "\n")
            results.flush()  # a crash later keeps the images already made
    times = list(per_image.values())
    summary = {
        "count": len(examples), "succeeded": len(per_image), "failed": len(failures),
        "model": model, "preset": preset,
        "load_seconds": None if load_seconds is None else round(load_seconds, 3),
        "total_seconds": round(time.perf_counter() - started_all, 3),
        "seconds_per_image": round(sum(times) / len(times), 3) if times else None,
        "per_image_seconds": per_image,
        "failures": failures,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
