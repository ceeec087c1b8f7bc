"""Checking a call's inputs before any work is done: the prompt, the concepts, and the
shapes of explicitly given noise. Every problem is a MagicFaceInputError naming it."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .config import Concept, GenerationConfig
from .errors import MagicFaceInputError
from .limits import LIMITS, TEXT_LIMITS

__all__ = ["check_call", "check_noise", "word_in_prompt"]



def word_in_prompt(word: str, prompt: str) -> bool:
    """The word (or the words of a phrase) stands alone in the prompt, ignoring case and
    the spacing between words: the rule the CLI and the gateway check before any model
    runs (the tokenizer's own check follows at sampling). Torch-free."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    return re.search(pattern, prompt, flags=re.IGNORECASE) is not None


def check_call(prompt, concepts, config) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise MagicFaceInputError("prompt must be a non-empty string")
    if not isinstance(config, GenerationConfig):
        raise MagicFaceInputError("config must be a GenerationConfig")
    if not isinstance(concepts, (list, tuple)):
        raise MagicFaceInputError("concepts must be a list of Concept")
    if len(prompt) > TEXT_LIMITS["prompt"]:
        raise MagicFaceInputError(f"prompt must be at most {TEXT_LIMITS['prompt']} characters")
    most = int(LIMITS["concepts"].high)
    if len(concepts) > most:
        raise MagicFaceInputError(f"at most {most} concepts per call, got {len(concepts)}")
    seen = set()
    for i, c in enumerate(concepts):
        if not isinstance(c, Concept):
            raise MagicFaceInputError(f"concepts[{i}] must be a Concept, got "
                                      f"{type(c).__name__}")
        w = c.word.strip().lower()
        if w in seen:
            raise MagicFaceInputError(f"concept word '{c.word}' is used by more than one "
                                      "concept")
        seen.add(w)


def check_noise(config: GenerationConfig, n_concepts: int, channels: int, scale_factor: int,
                latents=None, reference_noise=None) -> None:
    """`latents` must be (1, C, h, w) and `reference_noise` (steps, N, C, h, w)."""
    shape: Sequence[int] = (channels, config.height // scale_factor,
                            config.width // scale_factor)
    if latents is not None and tuple(latents.shape) != (1, *shape):
        raise MagicFaceInputError(f"latents must have shape {(1, *shape)}, "
                                  f"got {tuple(latents.shape)}")
    if reference_noise is not None and tuple(reference_noise.shape) != (
            config.steps, n_concepts, *shape):
        raise MagicFaceInputError(f"reference_noise must have shape "
                                  f"{(config.steps, n_concepts, *shape)}, "
                                  f"got {tuple(reference_noise.shape)}")
