"""Masks from the concept word on the command line: the options that make a
`MaskProposer` (shared by `magicface mask` and `generate`'s `mask=auto`), and the
proposals of the concepts that ask for one."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from magicface_core.errors import MagicFaceInputError

__all__ = ["AUTO", "add_mask_options", "proposer_from", "propose_auto_masks"]

# `--concept hat=hat.jpg,mask=auto`: the mask proposed from the word.
AUTO = "auto"


def add_mask_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--mask-detector", default=None, metavar="ID_OR_FOLDER",
                   help="a Grounding DINO model (e.g. IDEA-Research/grounding-dino-tiny) "
                        "that finds the concept's word in its image")
    g.add_argument("--mask-faces", action=argparse.BooleanOptionalAction, default=True,
                   help="for person words (man, woman, face, ...), find the face with "
                        "facenet-pytorch's MTCNN and take the head and shoulders")
    g.add_argument("--mask-threshold", type=float, default=0.3, metavar="SCORE",
                   help="the least detection score accepted, in [0, 1]")


def proposer_from(args: argparse.Namespace, device: str | None = None):
    """The proposer of the options (its models loaded here, once)."""
    from magicface_core.auto_masks import MaskProposer

    if not (args.mask_detector or args.mask_faces):
        raise MagicFaceInputError("masks from the word need --mask-detector or --mask-faces")
    return MaskProposer.from_settings(
        detector=args.mask_detector, sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type, faces=args.mask_faces,
        device=device or "cpu", threshold=args.mask_threshold)


def propose_auto_masks(specs: list[dict], make: Callable[[], Any],
                       say: Callable[[str], None]) -> list[dict]:
    """The concepts with `mask=auto` given their proposed masks (`make()` builds the
    proposer only when one asks). Raises MagicFaceInputError naming the concept when
    nothing is found in its image."""
    if not any(s.get("mask") == AUTO for s in specs):
        return specs
    proposer = make()
    out = []
    for i, spec in enumerate(specs):
        if spec.get("mask") != AUTO:
            out.append(spec)
            continue
        p = proposer(spec["image"], spec["word"],
                     reference_prompt=spec.get("reference_prompt"), index=i)
        say(f"concept {spec['word']!r}: mask proposed ({p.source}, score {p.score:.2f}, "
            f"box {p.box})")
        out.append({**spec, "mask": p.mask})
    return out
