"""The examples the tests run: the project's own drawn ones, and the public reference
examples beside a checkout when they are there."""

from __future__ import annotations

import json
import os
from pathlib import Path

from magicface_core import Concept

# The project's own drawn examples (scripts/make_examples.py): the suite needs nothing
# else. The public reference examples beside a checkout (../shared/examples, or
# MAGICFACE_EXAMPLES) are used too when they are there.
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHARED_EXAMPLES = Path(os.environ.get(
    "MAGICFACE_EXAMPLES", Path(__file__).resolve().parents[3] / "shared" / "examples"))


def shared_example_names() -> list[str]:
    if not SHARED_EXAMPLES.is_dir():
        return []
    return sorted(p.parent.name for p in SHARED_EXAMPLES.glob("*/example.json"))


def example(name: str, root: Path = EXAMPLES) -> dict:
    """An example.json with absolute image/mask paths."""
    root = root / name
    data = json.loads((root / "example.json").read_text())
    for c in data["concepts"]:
        c["image"] = root / c["image"]
        c["mask"] = root / c["mask"]
    return data


def example_concepts(name: str, limit: int | None = None) -> tuple[str, list[Concept]]:
    data = example(name)
    cs = [Concept(image=c["image"], mask=c["mask"], word=c["word"], weight=c["weight"],
                  reference_prompt=c["reference_prompt"]) for c in data["concepts"][:limit]]
    return data["prompt"], cs


def trio_job(n: int = 2) -> dict:
    data = example("trio")
    cs = data["concepts"][:n]
    return {
        "prompt": data["prompt"],
        "concepts": [{"word": c["word"], "weight": c["weight"],
                      "reference_prompt": c["reference_prompt"]} for c in cs],
        "images": [c["image"] for c in cs],
        "masks": [c["mask"] for c in cs],
    }
