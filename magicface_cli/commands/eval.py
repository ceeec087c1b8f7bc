"""`magicface eval`: the paper's metrics over a results folder (the work is
`evaluation`'s, which imports torch: loaded only when this command runs)."""

from __future__ import annotations

import argparse
import json

from ..progress import Progress

__all__ = ["evaluate"]


def evaluate(args: argparse.Namespace) -> int:
    if str(args.results) == "masks":
        return evaluate_masks(args)
    from ..evaluation import (
        DEFAULT_CLIP,
        DEFAULT_DINO,
        DEFAULT_FACENET,
        Evaluator,
        load_manifest,
        report_json,
    )

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    items = load_manifest(args.results)
    ev = Evaluator(metrics, clip=args.clip_model or DEFAULT_CLIP,
                   dino=args.dino_model or DEFAULT_DINO,
                   facenet=args.face_model or DEFAULT_FACENET, device=args.device or "cpu")
    with Progress(args.quiet).bar(len(items), "evaluating", "image") as bar:
        report = ev.evaluate(items, progress=lambda item: bar.update(1))
    print(report.table())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report_json(report, ev), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def evaluate_masks(args: argparse.Namespace) -> int:
    """`eval masks --examples ...`: the proposals against the hand masks; status 1 when
    some concept got none."""
    from magicface_core.errors import MagicFaceInputError

    from ..mask_eval import evaluate_masks as run
    from ..mask_eval import table
    from ..masks import proposer_from
    from ..runs import load_examples

    if not args.examples:
        raise MagicFaceInputError("eval masks: --examples names the examples with hand masks")
    examples = load_examples(args.examples)
    proposer = proposer_from(args, args.device)
    total = sum(c.mask is not None for ex in examples for c in ex.concepts)
    with Progress(args.quiet).bar(total, "proposing", "mask") as bar:
        rows = run(examples, proposer, progress=lambda: bar.update(1))
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in rows) else 0
