"""Draw the project's own synthetic demo references (no third-party images).

    python scripts/make_examples.py  # writes examples/synthetic/
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "examples" / "synthetic"


def face() -> tuple[Image.Image, Image.Image]:
    img = Image.new("RGB", (256, 256), (120, 170, 220))
    mask = Image.new("L", img.size, 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    d.rectangle((88, 180, 168, 256), fill=(60, 60, 140))  # shoulders
    m.rectangle((88, 180, 168, 256), fill=255)
    d.ellipse((68, 40, 188, 196), fill=(236, 196, 160), outline=(120, 80, 60), width=3)
    m.ellipse((68, 40, 188, 196), fill=255)
    d.chord((68, 30, 188, 120), 180, 360, fill=(90, 60, 30))  # hair
    m.chord((68, 30, 188, 120), 180, 360, fill=255)
    for x in (100, 140):
        d.ellipse((x, 100, x + 18, 114), fill="white")
        d.ellipse((x + 5, 102, x + 13, 112), fill=(40, 40, 40))
    d.line((128, 112, 122, 140, 132, 140), fill=(150, 100, 80), width=3)
    d.arc((104, 136, 152, 170), 20, 160, fill=(160, 40, 40), width=4)
    return img, mask


def hat() -> tuple[Image.Image, Image.Image]:
    img = Image.new("RGB", (256, 192), (245, 240, 230))
    mask = Image.new("L", img.size, 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for draw, crown, brim, band in ((d, (40, 40, 30), (30, 30, 25), (180, 30, 30)),
                                    (m, 255, 255, 255)):
        draw.ellipse((20, 120, 236, 170), fill=brim)
        draw.rectangle((72, 40, 184, 146), fill=crown)
        draw.ellipse((72, 28, 184, 56), fill=crown)
        draw.rectangle((72, 112, 184, 130), fill=band)
    return img, mask


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (img, mask) in {"face": face(), "hat": hat()}.items():
        img.save(OUT / f"{name}.png")
        mask.save(OUT / f"{name}_mask.png")
    example = {
        "prompt": "a man wearing a hat",
        "concepts": [
            {"image": "face.png", "mask": "face_mask.png", "word": "man", "weight": 3.0,
             "reference_prompt": "a cartoon man"},
            {"image": "hat.png", "mask": "hat_mask.png", "word": "hat", "weight": 2.0,
             "reference_prompt": "a black hat"},
        ],
        "seed": 1234,
        "source": "drawn by scripts/make_examples.py",
    }
    (OUT / "example.json").write_text(json.dumps(example, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
