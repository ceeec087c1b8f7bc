"""The `magicface` entry point: the parsed command to its module, and the exit status."""

from __future__ import annotations

import sys

from .args import build_parser
from .commands.eval import evaluate
from .commands.generate import generate
from .commands.mask import mask
from .commands.run import run
from .commands.secret import secret
from .commands.serve import serve

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 2 bad input or a model that cannot be had (nothing was
    generated: the user fixes the command); 1 `run` finished but some examples failed."""
    argv = sys.argv[1:] if argv is None else argv
    # serve's options are service.stack's: this parser would refuse them.
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {"generate": generate, "run": run, "mask": mask, "eval": evaluate,
                "secret": secret}
    try:
        return commands[args.command](args)
    except (ValueError, ImportError) as e:  # MagicFaceInputError is a ValueError
        message = " ".join(str(e).splitlines())
        print(f"magicface: error: {message}", file=sys.stderr)
        return 2
