"""`magicface mask IMAGE --word hat -o hat_mask.png`: the mask a job would get from
the word, to look at (and correct) before generating."""

from __future__ import annotations

import argparse
import json

from magicface_core.masks import load_image

from ..checks import check_image_file, check_image_output
from ..masks import proposer_from

__all__ = ["mask"]


def mask(args: argparse.Namespace) -> int:
    check_image_file(str(args.image), "IMAGE")
    check_image_output(args.out, "--out")
    image = load_image(str(args.image), "IMAGE")
    proposal = proposer_from(args, args.device)(
        image, args.word, reference_prompt=args.reference_prompt)
    proposal.mask.save(args.out)
    print(json.dumps({"out": str(args.out), "box": list(proposal.box),
                      "score": round(float(proposal.score), 4), "source": proposal.source}))
    return 0
