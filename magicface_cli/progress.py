"""What the user watches while a model loads and samples: messages and tqdm bars on
stderr (stdout keeps the results), all off with --quiet; and `sample`, the one call of
`pipe.generate` with a bar for the references and one for the steps."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magicface_core import GenerationConfig, MagicFacePipeline

__all__ = ["Progress", "silence_library_bars", "sample"]


class Progress:
    """Messages and tqdm bars on stderr (stdout keeps the results), all off with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str, unit: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=self.quiet)


def silence_library_bars() -> None:
    # diffusers, transformers and the hub client draw their own bars (downloads,
    # checkpoint shards); --quiet means none.
    import importlib

    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            importlib.import_module(name).disable_progress_bar()
        except ImportError:  # pragma: no cover - both come with the library
            pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def sample(pipe: MagicFacePipeline, prompt: str, concepts: Sequence[Any],
           config: GenerationConfig, progress: Progress) -> Any:
    """`pipe.generate` with a bar for preparing the references, then one for the steps:
    the pipeline's `on_references` hook closes the one and opens the other."""
    bars: dict[str, Any] = {}
    if concepts:
        bars["references"] = progress.bar(len(concepts), "references", "ref")

    def sampling_bar():
        if "sampling" not in bars:
            bars["sampling"] = progress.bar(config.steps, "sampling", "step")
        return bars["sampling"]

    def references_done(n: int) -> None:
        if "references" in bars:
            bars["references"].update(n)
            bars.pop("references").close()
        sampling_bar()

    try:
        return pipe.generate(prompt, concepts, config,
                             on_step=lambda step, total: sampling_bar().update(1),
                             on_references=references_done)
    finally:
        for bar in bars.values():
            bar.close()
