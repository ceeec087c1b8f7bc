"""`magicface eval`: the paper's metrics over a results folder (the work is
`evaluation`'s, which imports torch: loaded only when this command runs)."""

from __future__ import annotations

import argparse
import json

from ..progress import Progress

__all__ = ["evaluate"]


def evaluate(args: argparse.Namespace) -> int:
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
