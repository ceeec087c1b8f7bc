from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_core.cli import main, overlay_semantic_map, parse_concept

from ..helpers.examples import EXAMPLES


def test_parse_concept():
    assert parse_concept("man=a.jpg") == {"word": "man", "image": "a.jpg"}
    got = parse_concept("hat=h.png,mask=m.png,weight=2.5,ref=a man, with a hat,box=1:2:30:40")
    assert got == {"word": "hat", "image": "h.png", "mask": "m.png", "weight": 2.5,
                   "reference_prompt": "a man, with a hat", "box": (1.0, 2.0, 30.0, 40.0)}
    for bad in ("man", "=a.jpg", "man=a.jpg,weight=x", "man=a.jpg,box=1:2"):
        with pytest.raises(ValueError, match="--concept"):
            parse_concept(bad)


def test_overlay_tints_only_concept_regions():
    img = Image.new("RGB", (8, 8), (100, 100, 100))
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:2, :2] = 1
    out = np.asarray(overlay_semantic_map(img, labels))
    assert (out[4:, 4:] == 100).all()
    assert not (out[:4, :4] == 100).all()


def test_cli_generates_image_and_maps(tmp_path, capsys):
    trio = EXAMPLES / "trio"
    out, maps = tmp_path / "out.png", tmp_path / "maps.png"
    rc = main(["generate", "--tiny", "--prompt", "a man with a hat", "--steps", "3",
               "--concept", f"man={trio / 'man.jpg'},mask={trio / 'man_mask.jpg'},"
                            "weight=2.5,ref=a man",
               "--concept", f"hat={trio / 'hat.jpg'},mask={trio / 'hat_mask.jpg'}",
               "--out", str(out), "--save-maps", str(maps), "--seed", "4"])
    assert rc == 0
    assert Image.open(out).size == (128, 128)
    assert Image.open(maps).size == (128, 128 + 2 * 16 + 4)  # the legend strip below
    err = capsys.readouterr().err
    assert "random weights" in err and "sampling" in err


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    trio = EXAMPLES / "trio"
    proc = subprocess.run(
        [sys.executable, "-m", "magicface_core.cli", "generate", "--tiny", "--prompt",
         "a man", "--steps", "2", "--concept",
         f"scarf={trio / 'man.jpg'},mask={trio / 'man_mask.jpg'}",
         "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "concept word 'scarf' does not occur" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_fold_bias_gives_the_same_image(tmp_path):
    trio = EXAMPLES / "trio"
    outs = []
    for extra in ([], ["--no-fold-bias"]):
        out = tmp_path / f"out{len(extra)}.png"
        rc = main(["generate", "--tiny", "--prompt", "a man with a hat", "--steps", "3",
                   "--concept", f"man={trio / 'man.jpg'},mask={trio / 'man_mask.jpg'}",
                   "--concept", f"hat={trio / 'hat.jpg'},mask={trio / 'hat_mask.jpg'}",
                   "--out", str(out), "--seed", "2", *extra])
        assert rc == 0
        outs.append(np.asarray(Image.open(out)).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1


def test_cli_preset_and_ca_scale(tmp_path):
    trio = EXAMPLES / "trio"
    base = ["generate", "--tiny", "--prompt", "a man with a hat", "--steps", "3", "--seed", "2",
            "--concept", f"man={trio / 'man.jpg'},mask={trio / 'man_mask.jpg'}",
            "--concept", f"hat={trio / 'hat.jpg'},mask={trio / 'hat_mask.jpg'}"]
    images = {}
    for name, extra in {"authors": [], "paper": ["--preset", "paper"],
                        "ca": ["--ca-scale", "1.0"]}.items():
        out = tmp_path / f"{name}.png"
        assert main([*base, "--out", str(out), *extra]) == 0
        images[name] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(images["authors"] - images["paper"]).max() > 10
    assert np.abs(images["authors"] - images["ca"]).max() > 0
    assert main([*base, "--out", str(tmp_path / "x.png"), "--ca-scale", "1.5"]) == 2
    assert not (tmp_path / "x.png").exists()
