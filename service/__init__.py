"""The MagicFace HTTP gateway (FastAPI). Imports no torch."""
