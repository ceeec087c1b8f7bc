"""Masks from the word on the command line: `magicface mask` on real photos (MTCNN's
shipped weights; scikit-image's astronaut, a woman, and chelsea, a cat) and generate's
`mask=auto`, which proposes before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as samples

from magicface_cli import main

from .test_generate import gen, no_model  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("photos")
    out = {}
    for name, array in (("woman", samples.astronaut()[::2, ::2]),
                        ("cat", samples.chelsea())):
        out[name] = tmp / f"{name}.png"
        Image.fromarray(array).save(out[name])
    return out


def test_mask_writes_the_proposal_and_says_where_it_came_from(photos, tmp_path, capsys):
    out = tmp_path / "woman_mask.png"
    assert main(["mask", str(photos["woman"]), "--word", "woman", "-o", str(out)]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["source"] == "face+ellipse" and said["out"] == str(out)
    mask = np.asarray(Image.open(out))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
    x0, y0, x1, y1 = said["box"]
    assert (mask[y0:y1, x0:x1] == 255).sum() == (mask == 255).sum() > 0


def test_mask_finding_nothing_fails_naming_the_word(photos, tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["mask", str(photos["cat"]), "--word", "man", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no 'man' found" in err and "pass a mask" in err, err
    assert not out.exists()
    # Not a person word and no text detector: said so, not an ellipse of the image.
    assert main(["mask", str(photos["cat"]), "--word", "hat", "-o", str(out)]) == 2
    assert "no 'hat' found" in capsys.readouterr().err


def test_generate_with_mask_auto(photos, tmp_path, capsys):
    spec = f"woman={photos['woman']},mask=auto"
    assert main(gen(tmp_path, prompt="a woman", concepts=(spec,))) == 0
    assert (tmp_path / "o.png").exists()
    assert "mask proposed (face+ellipse" in capsys.readouterr().err


def test_generate_mask_auto_errors_come_before_the_model(photos, tmp_path, capsys,
                                                         no_model):
    spec = f"man={photos['cat']},mask=auto"
    assert main(gen(tmp_path, prompt="a man", concepts=(spec,))) == 2
    assert "no 'man' found in reference 1" in capsys.readouterr().err
    assert main(gen(tmp_path, "--no-mask-faces", prompt="a man", concepts=(spec,))) == 2
    assert "mask=auto needs --mask-detector or --mask-faces" in capsys.readouterr().err
