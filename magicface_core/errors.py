"""The library's exceptions."""

from __future__ import annotations

__all__ = ["MagicFaceInputError"]


class MagicFaceInputError(ValueError):
    """The caller's input is wrong (a config value, a concept, an image, a mask, a word
    the prompt lacks, a tensor of the wrong shape): the message names the field and the
    problem. Services report it to their client; any other exception is a fault of
    the library or the machine."""
