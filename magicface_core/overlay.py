"""The semantic map drawn over the image: one colour per concept (the legend the CLI,
the service and the web page share). Imports neither torch nor numpy at load."""

from __future__ import annotations

__all__ = ["PALETTE", "concept_color", "overlay_semantic_map"]

# Label colours: index 0 (background) is never drawn, then distinct hues per concept.
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def _label_color(label: int) -> tuple[int, int, int]:
    # Concepts past the palette wrap around, skipping the background's entry.
    return PALETTE[1 + (label - 1) % (len(PALETTE) - 1)] if label > 0 else PALETTE[0]


def concept_color(index: int) -> tuple[int, int, int]:
    """The tint of concept `index` (0-based, in request order)."""
    return _label_color(index + 1)


def overlay_semantic_map(image, labels, alpha: float = 0.5):
    """The image with each concept's region (label i + 1 for concept i) tinted in its
    colour."""
    import numpy as np
    from PIL import Image

    lab = Image.fromarray(labels.numpy().astype(np.uint8), "L").resize(image.size,
                                                                      Image.Resampling.NEAREST)
    lab = np.asarray(lab)
    colours = np.asarray([_label_color(i) for i in range(int(lab.max()) + 1)],
                         dtype=np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = colours[lab]
    blend = np.where((lab > 0)[..., None], (1 - alpha) * base + alpha * tint, base)
    return Image.fromarray(blend.round().astype(np.uint8))
