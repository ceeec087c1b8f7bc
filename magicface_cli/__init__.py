"""The `magicface` command line: `generate`, `run` (many examples, one model load),
`eval` (the paper's metrics), `serve` (the local stack) and `secret`.

An app on top of the method: it imports `magicface_core` (and only its public modules),
never the other way round. Every input is checked before a model loads.
"""

from .app import main

__all__ = ["main"]
