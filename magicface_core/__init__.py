"""MagicFace: training-free universal-style human image customization on Stable Diffusion.

`Concept` and `GenerationConfig` import without torch (the gateway validates with
them); the pipeline loads torch and diffusers on first use.
"""

from typing import TYPE_CHECKING

from .config import Concept, GenerationConfig
from .errors import MagicFaceInputError
from .version import __version__

if TYPE_CHECKING:
    from .output import MagicFacePipelineOutput
    from .pipeline import MagicFacePipeline, MagicFaceResult, load_pipeline

__all__ = ["Concept", "GenerationConfig", "MagicFaceInputError", "MagicFacePipeline",
           "MagicFaceResult", "MagicFacePipelineOutput", "load_pipeline", "__version__"]


def __getattr__(name: str):
    if name == "MagicFacePipelineOutput":
        from .output import MagicFacePipelineOutput

        return MagicFacePipelineOutput
    if name in ("MagicFacePipeline", "MagicFaceResult", "load_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'magicface_core' has no attribute {name!r}")
