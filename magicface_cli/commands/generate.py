"""`magicface generate`: one image from reference concepts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from magicface_core.config import Concept
from magicface_core.errors import MagicFaceInputError

from ..args import config_from
from ..checks import (
    check_concepts,
    check_image_output,
    check_options,
    check_prompt,
    parse_concept,
)
from ..maps import save_maps
from ..masks import propose_auto_masks, proposer_from
from ..model_source import load_model, locate_model
from ..progress import Progress, sample

__all__ = ["generate"]


def _concept_label(specs: Sequence[dict]) -> Callable[[int, str], str]:
    # The rule book names a field "concepts[1].weight"; a user typed `--concept hat`.
    def label(i: int, field: str) -> str:
        if not 0 <= i < len(specs):  # the concepts as a whole
            return "--concept"
        head = f"--concept {specs[i].get('word')}"
        return head if field in ("", "word") else f"{head} {field}"

    return label


def _check_outputs(args: argparse.Namespace) -> None:
    check_image_output(args.out, "--out")
    if args.save_maps is not None:
        check_image_output(args.save_maps, "--save-maps")
        if args.save_maps.expanduser().absolute() == args.out.expanduser().absolute():
            raise MagicFaceInputError("--save-maps: the same file as --out")


def generate(args: argparse.Namespace) -> int:
    # 1. Everything that can be checked without a model, in the order a user reads it.
    check_prompt(args.prompt)
    specs = [parse_concept(s) for s in args.concept]
    check_options(args)
    check_concepts(args.prompt, specs, _concept_label(specs), args.sam_checkpoint,
                   auto_masks=bool(args.mask_detector or args.mask_faces))
    _check_outputs(args)
    config = config_from(args, args.seed, args.save_maps is not None)
    source = locate_model(args.model, args.tiny)
    progress = Progress(args.quiet)
    # 2. Masks from the words (mask=auto): before the model, so nothing found costs
    # no model load.
    specs = propose_auto_masks(specs, lambda: proposer_from(args, args.device),
                               progress.say)
    concepts = [Concept(**spec) for spec in specs]
    # 3. The model, then the image.
    pipe = load_model(args, source, progress)
    res = sample(pipe, args.prompt, concepts, config, progress)
    res.image.save(args.out)
    print(f"wrote {args.out}")
    if args.save_maps is not None:
        if res.semantic_maps:
            for path in save_maps(res, [c.word for c in concepts], args.save_maps,
                                  args.save_maps_every):
                print(f"wrote {path}")
        else:
            # A warning, not progress: what was asked for was not written.
            print("magicface: no semantic maps to save: there are no concepts", file=sys.stderr)
    return 0
