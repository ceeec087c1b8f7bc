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


@pytest.mark.usefixtures("no_model")
def test_generate_mask_auto_errors_come_before_the_model(photos, tmp_path, capsys):
    spec = f"man={photos['cat']},mask=auto"
    assert main(gen(tmp_path, prompt="a man", concepts=(spec,))) == 2
    assert "no 'man' found in reference 1" in capsys.readouterr().err
    assert main(gen(tmp_path, "--no-mask-faces", prompt="a man", concepts=(spec,))) == 2
    assert "mask=auto needs --mask-detector or --mask-faces" in capsys.readouterr().err


def test_iou():
    from magicface_cli.mask_eval import iou

    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(~a & a, ~a & a) == 1.0
    with pytest.raises(ValueError):
        iou(a, np.zeros((2, 2), bool))


def test_eval_masks_scores_the_proposals_against_the_hand_masks(photos, tmp_path, capsys):
    """A hand mask around her head scores well above chance; a concept with nothing
    found is listed with its error, and the status says some got none."""
    folder = tmp_path / "examples"
    for name, photo, word, box in (("portrait", "woman", "woman", (64, 0, 160, 170)),
                                   ("cat", "cat", "man", (100, 50, 300, 250))):
        (folder / name).mkdir(parents=True)
        img = Image.open(photos[photo])
        img.save(folder / name / "ref.png")
        hand = Image.new("L", img.size, 0)
        hand.paste(255, box)
        hand.save(folder / name / "ref_mask.png")
        (folder / name / "example.json").write_text(json.dumps({
            "prompt": f"a {word}", "concepts": [{"word": word, "image": "ref.png",
                                                 "mask": "ref_mask.png"}]}))
    out = tmp_path / "masks.json"
    assert main(["eval", "masks", "--examples", str(folder), "--out", str(out),
                 "--quiet"]) == 1
    rows = {r["example"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["portrait"]["source"] == "face+ellipse"
    assert rows["portrait"]["iou"] > 0.4, rows
    assert "no 'man' found" in rows["cat"]["error"]
    printed = capsys.readouterr().out
    assert "mean IoU" in printed and "over 1 of 2 concepts" in printed


def test_mask_with_a_text_detector_and_sam(tmp_path, capsys, monkeypatch):
    """`magicface mask` through a tiny random Grounding DINO folder and a tiny SAM
    checkpoint (segment-anything's registry given a tiny model type): the plumbing from
    the options to the written mask."""
    import segment_anything
    import torch

    from ..helpers.detectors import tiny_grounding_dino
    from ..helpers.images import noise_image
    from ..helpers.pipeline import tiny_sam

    dino = tiny_grounding_dino(tmp_path / "dino")
    ckpt = tmp_path / "sam.pth"
    torch.save(tiny_sam().state_dict(), ckpt)

    def build(checkpoint=None):
        model = tiny_sam()
        model.load_state_dict(torch.load(checkpoint))
        return model

    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", build)
    image = tmp_path / "hat.png"
    noise_image(2, (90, 60)).save(image)
    out = tmp_path / "hat_mask.png"
    base = ["mask", str(image), "--word", "hat", "-o", str(out), "--mask-detector", str(dino),
            "--mask-threshold", "0", "--no-mask-faces"]
    assert main(base) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["source"] == "detector+ellipse"
    assert np.asarray(Image.open(out)).shape == (60, 90)
    status = main([*base, "--sam-checkpoint", str(ckpt), "--sam-model-type", "tiny"])
    captured = capsys.readouterr()
    if status == 0:  # random SAM weights may outline nothing: then it says so
        assert json.loads(captured.out.strip().splitlines()[-1])["source"] == "detector+sam"
    else:
        assert status == 2 and "no 'hat' segmented" in captured.err, captured.err
