"""MagicFacePipeline: loading, the fast-loop switches, `generate` (validate, prepare
the call, run a loop, decode) and the diffusers-style `__call__` built on it.

One class made of mixins, one module each, as diffusers keeps loading apart from the
call: `base` (the class, loading, `load_pipeline`), `switches` (the fast loop's),
`device` (placement, model offload), `generate` (one image and the pieces it is
prepared with), `batching` (`generate_batch`: grouping, the out-of-memory fallback),
`call` (`__call__` in numbered steps) and `results` (requests and results)."""

from .base import MagicFacePipeline, load_pipeline
from .results import (
    OUTPUT_TYPES,
    GenerationRequest,
    MagicFaceResult,
    ReferencesCallback,
    StepCallback,
)

__all__ = ["MagicFacePipeline", "MagicFaceResult", "GenerationRequest", "load_pipeline",
           "OUTPUT_TYPES", "ReferencesCallback", "StepCallback"]
