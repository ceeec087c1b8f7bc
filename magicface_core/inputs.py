"""Checking a call's inputs before any work is done: the prompt, the concepts, and the
shapes of explicitly given noise. Every problem is a MagicFaceInputError naming it."""

from __future__ import annotations

from collections.abc import Sequence

from .config import Concept, GenerationConfig
from .errors import MagicFaceInputError
from .rules import concept_problems, prompt_problems, word_in_prompt

__all__ = ["check_call", "check_noise", "word_in_prompt"]



def check_call(prompt, concepts, config) -> None:
    """The call's prompt and concepts by the rule book (`rules`); a call with no concepts
    is plain Stable Diffusion (the baseline the parity tests compare against)."""
    problems = prompt_problems(prompt)
    if problems:
        raise MagicFaceInputError(problems[0].text())
    if not isinstance(config, GenerationConfig):
        raise MagicFaceInputError("config must be a GenerationConfig")
    if not isinstance(concepts, (list, tuple)):
        raise MagicFaceInputError("concepts must be a list of Concept")
    for i, c in enumerate(concepts):
        if not isinstance(c, Concept):
            raise MagicFaceInputError(f"concepts[{i}] must be a Concept, got "
                                      f"{type(c).__name__}")
    problems = concept_problems(prompt, concepts, least=0)
    if problems:
        raise MagicFaceInputError(problems[0].text())


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
