"""Draw the project's own example references (no third-party images).

    python scripts/make_examples.py  # writes examples/{synthetic,trio,solo}/

- synthetic: "a man wearing a hat", two PNG concepts (the demos use it);
- trio: "a man with a hat wearing sunglasses", three concepts saved as JPEG (masks
  too, so their compression-noisy edges are exercised) with a word the CLIP tokenizer
  splits ("sunglasses");
- solo: one concept, "a woman in the snow".
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1] / "examples"


def face(background=(120, 170, 220), skin=(236, 196, 160),
         hair=(90, 60, 30)) -> tuple[Image.Image, Image.Image]:
    img = Image.new("RGB", (256, 256), background)
    mask = Image.new("L", img.size, 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    d.rectangle((88, 180, 168, 256), fill=(60, 60, 140))  # shoulders
    m.rectangle((88, 180, 168, 256), fill=255)
    d.ellipse((68, 40, 188, 196), fill=skin, outline=(120, 80, 60), width=3)
    m.ellipse((68, 40, 188, 196), fill=255)
    d.chord((68, 30, 188, 120), 180, 360, fill=hair)
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


def sunglasses() -> tuple[Image.Image, Image.Image]:
    img = Image.new("RGB", (240, 120), (250, 250, 250))
    mask = Image.new("L", img.size, 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for draw, lens, frame in ((d, (20, 20, 30), (60, 60, 60)), (m, 255, 255)):
        draw.ellipse((20, 30, 110, 95), fill=lens, outline=frame, width=5)
        draw.ellipse((130, 30, 220, 95), fill=lens, outline=frame, width=5)
        draw.rectangle((105, 50, 135, 58), fill=frame)
    return img, mask


def write(name: str, prompt: str, concepts: list[tuple], seed: int, fmt: str) -> None:
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for file, (img, mask), word, weight, ref in concepts:
        ext = "jpg" if fmt == "JPEG" else "png"
        img.save(out / f"{file}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        mask.save(out / f"{file}_mask.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        entries.append({"image": f"{file}.{ext}", "mask": f"{file}_mask.{ext}", "word": word,
                        "weight": weight, "reference_prompt": ref})
    example = {"prompt": prompt, "concepts": entries, "seed": seed,
               "source": "drawn by scripts/make_examples.py"}
    (out / "example.json").write_text(json.dumps(example, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    write("synthetic", "a man wearing a hat",
          [("face", face(), "man", 3.0, "a cartoon man"),
           ("hat", hat(), "hat", 2.0, "a black hat")], 1234, "PNG")
    write("trio", "a man with a hat wearing sunglasses",
          [("man", face(hair=(30, 30, 30)), "man", 2.5, "a man"),
           ("hat", hat(), "hat", 2.0, "a man"),
           ("sunglasses", sunglasses(), "sunglasses", 2.0, "a man wearing sunglasses")],
          4242, "JPEG")
    write("solo", "a woman in the snow",
          [("woman", face((200, 220, 240), (250, 215, 190), (200, 120, 40)), "woman", 3.0,
            "a woman")], 7, "PNG")


if __name__ == "__main__":
    main()
