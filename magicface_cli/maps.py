"""The semantic maps a run asked for with --save-maps: the final map over the image with
a legend, the raw label map, and the overlay every K steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magicface_core.overlay import concept_color, overlay_semantic_map

__all__ = ["save_maps", "with_legend"]


def with_legend(image: Any, words: Sequence[str]) -> Any:
    """The image with a white strip below: per concept, a swatch of its colour
    (`overlay.concept_color`) and its word in PIL's default font."""
    from PIL import Image, ImageDraw

    row = 16
    strip = Image.new("RGB", (image.width, row * max(1, len(words)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, word in enumerate(words):
        y = 2 + i * row
        draw.rectangle([4, y + 2, 16, y + 13], fill=concept_color(i))
        draw.text((22, y + 2), word, fill=(0, 0, 0))
    out = Image.new("RGB", (image.width, image.height + strip.height), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(strip, (0, image.height))
    return out


def save_maps(res: Any, words: Sequence[str], path: Path,
              every: int | None = None) -> list[Path]:
    """The final map over the image with a legend at `path`, the raw label map
    (indices at the map's own resolution: 0 background, i + 1 concept i) as
    `<stem>_labels.png`, and with `every` the overlay each `every` steps as
    `<stem>_step<NNN>.png` (1-based steps, over the final image)."""
    from PIL import Image

    written = [path]
    with_legend(overlay_semantic_map(res.image, res.semantic_maps[-1]), words).save(path)
    labels_path = path.with_name(f"{path.stem}_labels.png")
    # uint8 holds every label: at most LIMITS["concepts"].high concepts.
    Image.fromarray(res.semantic_maps[-1].numpy().astype("uint8")).save(labels_path)
    written.append(labels_path)
    if every:
        for i in range(every - 1, len(res.semantic_maps), every):
            step_path = path.with_name(f"{path.stem}_step{i + 1:03d}.png")
            with_legend(overlay_semantic_map(res.image, res.semantic_maps[i]),
                        words).save(step_path)
            written.append(step_path)
    return written
