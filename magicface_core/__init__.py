"""MagicFace: training-free universal-style human image customization on Stable Diffusion."""

from .config import Concept, GenerationConfig
from .pipeline import MagicFacePipeline, MagicFaceResult

__all__ = ["Concept", "GenerationConfig", "MagicFacePipeline", "MagicFaceResult"]
__version__ = "0.1.0"
