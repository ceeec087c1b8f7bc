"""`magicface run`: many examples with one model load (the work is `runs`')."""

from __future__ import annotations

import argparse
import time
from typing import Any

from magicface_core.errors import MagicFaceInputError

from ..args import config_from
from ..checks import check_options, check_writable_folder
from ..maps import save_maps
from ..model_source import load_model, locate_model
from ..progress import Progress, sample
from ..runs import SUMMARY_FILE, Example, load_examples, run_examples

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    # 1. Every option and every example, before the model.
    check_options(args)
    check_writable_folder(args.out, "--out")
    examples = load_examples(args.inputs, sam_checkpoint=args.sam_checkpoint)
    configs = {}
    for ex in examples:
        try:
            configs[ex.name] = config_from(
                args, args.seed if args.seed is not None else ex.seed, args.save_maps)
        except MagicFaceInputError as e:
            raise MagicFaceInputError(f"{ex.where}: {e}") from None
    source = locate_model(args.model, args.tiny)
    # 2. One model for all of them.
    progress = Progress(args.quiet)
    started = time.perf_counter()
    pipe = load_model(args, source, progress)
    load_seconds = time.perf_counter() - started

    def maps_of(ex: Example, res: Any) -> dict:
        if not args.save_maps or not res.semantic_maps:
            return {}
        paths = save_maps(res, [c.word for c in ex.concepts], args.out / f"{ex.name}_maps.png",
                          args.save_maps_every)
        return {"maps": paths[0].name, "labels": paths[1].name}

    summary = run_examples(
        lambda ex, config: sample(pipe, ex.prompt, ex.concepts, config, progress),
        examples, lambda ex: configs[ex.name], args.out, log=progress.say,
        model=source.name, preset=args.preset, load_seconds=load_seconds, on_result=maps_of)
    print(f"wrote {summary['succeeded']} of {summary['count']} images, results.jsonl and "
          f"{SUMMARY_FILE} in {args.out}")
    # 1, not 2: the inputs were fine; generating some of them failed (see the summary).
    return 0 if summary["failed"] == 0 else 1
