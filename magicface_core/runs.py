"""Many examples with one model load (`magicface run`): finding example.json files,
reading them, and writing the results folder that `magicface eval` reads."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import Concept, GenerationConfig
from .errors import MagicFaceInputError

__all__ = ["Example", "find_examples", "read_example", "load_examples", "run_examples",
           "read_manifest", "RESULTS_FILE", "SUMMARY_FILE"]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class Example:
    name: str  # the folder's name (or the file's stem): the output image's name
    path: Path  # the example.json
    prompt: str
    concepts: list[Concept]
    data: dict  # the file as read (its concepts' paths relative to it)

    @property
    def seed(self) -> int:
        return int(self.data.get("seed", 0))


def find_examples(inputs: Sequence[Path]) -> list[Path]:
    """example.json files (and .jsonl manifests) named by `inputs` (files, folders
    holding one, or folders of such folders), in order, each once."""
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


def read_example(path: Path, data: dict | None = None, name: str | None = None) -> Example:
    """An example.json (or one line of a manifest, `data`, its paths relative to the
    manifest's folder)."""
    try:
        data = json.loads(path.read_text()) if data is None else data
        concepts = []
        for c in data["concepts"]:
            spec = {k: c[k] for k in ("word", "weight", "reference_prompt") if k in c}
            for key in ("image", "mask"):
                if c.get(key):
                    spec[key] = str(path.parent / c[key])
            concepts.append(Concept(**spec))
        prompt = data["prompt"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise MagicFaceInputError(f"{path}: not an example.json ({e})") from None
    if name is None:
        name = path.parent.name if path.name == "example.json" else path.stem
    return Example(name, path, prompt, concepts, data)


def read_manifest(path: Path) -> list[Example]:
    """A .jsonl manifest: one example object per line (`name` optional)."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise MagicFaceInputError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise MagicFaceInputError(f"{path}:{i}: not an example object")
        try:
            out.append(read_example(path, data, str(data.get("name") or f"{path.stem}-{i}")))
        except MagicFaceInputError as e:
            raise MagicFaceInputError(f"{path}:{i}: {e}") from None
    return out


def load_examples(inputs: Sequence[Path]) -> list[Example]:
    """Every example named by `inputs`, read and checked (before any model loads)."""
    examples: list[Example] = []
    for p in find_examples(inputs):
        examples.extend(read_manifest(p) if p.suffix == ".jsonl" else [read_example(p)])
    names = [e.name for e in examples]
    if len(set(names)) != len(names):
        raise MagicFaceInputError(f"two examples share a name: {names}")
    return examples


def _result_line(ex: Example, config: GenerationConfig, seconds: float, out: Path) -> dict:
    def rel(p: str) -> str:
        return os.path.relpath(ex.path.parent / p, out)


    return {
        "name": ex.name, "image": f"{ex.name}.png", "prompt": ex.prompt,
        "example": rel(ex.path.name),
        "concepts": [{"word": c["word"], "image": rel(c["image"]),
                      **({"mask": rel(c["mask"])} if c.get("mask") else {}),
                      **({"face": c["face"]} if "face" in c else {})}
                     for c in ex.data["concepts"]],
        "seed": config.seed, "preset": config.preset, "seconds": round(seconds, 3),
    }


def run_examples(generate: Callable[[Example, GenerationConfig], object],
                 examples: Sequence[Example],
                 config_of: Callable[[Example], GenerationConfig], out: Path,
                 log: Callable[[str], None] = print, model: str | None = None) -> Path:
    """`generate(example, config)` (a result with `.image`) for each example; writes
    `<name>.png`, RESULTS_FILE (one JSON line per image, paths relative to `out`) and
    SUMMARY_FILE (counts and timings). An example that fails is logged and counted; the
    others go on."""
    out.mkdir(parents=True, exist_ok=True)
    lines, failures = [], []
    total = time.perf_counter()
    for i, ex in enumerate(examples, 1):
        log(f"[{i}/{len(examples)}] {ex.name}: {ex.prompt}")
        config = config_of(ex)
        started = time.perf_counter()
        try:
            res = generate(ex, config)
        except MagicFaceInputError as e:
            log(f"  {ex.name} failed: {e}")
            failures.append({"name": ex.name, "error": str(e)})
            continue
        seconds = time.perf_counter() - started
        res.image.save(out / f"{ex.name}.png")
        lines.append(_result_line(ex, config, seconds, out))
    path = out / RESULTS_FILE
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    seconds = [x["seconds"] for x in lines]
    summary = {"count": len(examples), "succeeded": len(lines), "failed": len(failures),
               "failures": failures, "model": model,
               "presets": sorted({x["preset"] for x in lines}),
               "total_seconds": round(time.perf_counter() - total, 3),
               "seconds_per_image": round(sum(seconds) / len(seconds), 3) if seconds else None}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return path
