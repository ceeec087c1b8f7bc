"""Small images the tests draw."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def solid(color, size=(96, 80)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise_image(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask_image(size=(96, 80), box=None, value=255) -> Image.Image:
    m = Image.new("L", size, 0)
    if box is not None:
        m.paste(value, box)
    return m


def png(size=(64, 48), color=(200, 10, 10), fmt="PNG") -> bytes:
    """An encoded image of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()
