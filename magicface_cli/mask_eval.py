"""`magicface eval masks --examples DIR`: how close the proposed masks come to the
examples' hand-made ones (intersection over union per concept), for users with the
detector and SAM weights to pick MASK_DETECTOR and MASK_THRESHOLD with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from magicface_core.errors import MagicFaceInputError
from magicface_core.masks import binarize_mask, load_image

__all__ = ["iou", "evaluate_masks", "table"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two bool masks of one shape (1 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks of shapes {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def evaluate_masks(examples: list, proposer: Callable[..., Any],
                   progress: Callable[[], None] = lambda: None) -> list[dict]:
    """One row per concept with a hand mask: its IoU, source and score, or the error
    that the proposal met (nothing found)."""
    rows = []
    for ex in examples:
        for i, c in enumerate(ex.concepts):
            if c.mask is None:
                continue
            row = {"example": ex.name, "concept": i, "word": c.word}
            try:
                p = proposer(c.image, c.word, reference_prompt=c.reference_prompt, index=i)
            except MagicFaceInputError as e:
                rows.append({**row, "error": str(e)})
                progress()
                continue
            truth = binarize_mask(load_image(c.mask, f"{ex.name} concepts[{i}].mask"))
            rows.append({**row, "iou": round(iou(binarize_mask(p.mask), truth), 4),
                         "source": p.source, "score": round(float(p.score), 4)})
            progress()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'example':<24} {'word':<16} {'IoU':>6}  source"]
    for r in rows:
        result = (f"{r['iou']:>6.3f}  {r['source']} ({r['score']:.2f})" if "iou" in r
                  else f"{'-':>6}  {r['error']}")
        lines.append(f"{r['example'][:24]:<24} {r['word'][:16]:<16} {result}")
    found = [r["iou"] for r in rows if "iou" in r]
    mean = f"{np.mean(found):.3f}" if found else "-"
    lines.append(f"mean IoU {mean} over {len(found)} of {len(rows)} concepts")
    return "\n".join(lines)
