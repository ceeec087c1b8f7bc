"""The command line checks every input before any model is built or loaded (exit 2,
the problem named), keeps one vocabulary with the library, shows its defaults, runs
many examples with one model load, and writes semantic maps with a legend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import magicface_core
import magicface_core.pipeline as pipeline_module
from magicface_core.cli import main, parse_concept
from magicface_core.overlay import concept_color

from ..helpers.examples import EXAMPLES

TRIO = EXAMPLES / "trio"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model(monkeypatch):
    """Any model load is an error: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline_module, "load_pipeline", refuse)
    monkeypatch.setattr(pipeline_module.MagicFacePipeline, "tiny", refuse)


def gen(*extra: str, out: str | None = None, tmp: Path) -> list[str]:
    return ["generate", "--tiny", "--prompt", "a man with a hat", "--steps", "2",
            "--out", out or str(tmp / "o.png"),
            "--concept", f"man={TRIO / 'man.jpg'},mask={TRIO / 'man_mask.jpg'}", *extra]


@pytest.mark.parametrize("extra,out,message", [
    (["--concept", "hat=/nonexistent/hat.jpg"], None, "no such file: /nonexistent/hat.jpg"),
    (["--concept", f"hat={TRIO / 'example.json'}"], None, "is not a decodable image"),
    (["--concept", f"hat={TRIO / 'hat.jpg'},mask={TRIO / 'man_mask.jpg'}"], None,
     "--concept hat mask:"),
    (["--concept", f"scarf={TRIO / 'hat.jpg'}"], None, "'scarf' does not occur in the prompt"),
    (["--concept", f"man={TRIO / 'hat.jpg'}"], None, "used by more than one concept"),
    (["--concept", f"hat={TRIO / 'hat.jpg'},masks={TRIO / 'hat_mask.jpg'}"], None,
     "unknown key 'masks'"),
    (["--concept", f"hat={TRIO / 'hat.jpg'},weight=25"], None, "weight must be in (0, 20]"),
    (["--steps", "0"], None, "--steps: steps must be in [1, 200]"),
    (["--width", "100"], None, "--width: width must be a multiple of 8"),
    (["--alpha", "1.5"], None, "--alpha: alpha must be in [0, 1]"),
    ([], "x.xyz", "--out: x.xyz must end in one of .png, .jpg, .jpeg, .webp"),
    ([], "/proc/nope/x.png", "--out: cannot write into /proc/nope"),
    (["--save-maps", "maps.jpg"], None, "--save-maps: maps.jpg must end in one of .png"),
])
def test_bad_input_fails_before_any_model(no_model, tmp_path, capsys, extra, out, message):
    assert main(gen(*extra, out=out, tmp=tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "o.png").exists()


def test_hub_model_offline_fails_at_once_with_a_hint(no_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = gen(tmp=tmp_path)
    args.remove("--tiny")
    assert main([*args, "--model", "someone/not-cached-model"]) == 2
    err = capsys.readouterr().err
    assert "--tiny" in err and "local/diffusers/folder" in err and "not-cached" in err
    assert main([*args, "--model", "./no/such/folder"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_concept_keys_and_the_reference_prompt_alias():
    assert parse_concept("hat=h.png,reference_prompt=a hat, red") == {
        "word": "hat", "image": "h.png", "reference_prompt": "a hat, red"}
    assert parse_concept("hat=h.png,ref=a hat")["reference_prompt"] == "a hat"
    with pytest.raises(ValueError, match="unknown key 'wieght'"):
        parse_concept("hat=h.png,wieght=2")


def test_version_and_help_show_defaults():
    out = subprocess.run([sys.executable, "-m", "magicface_core.cli", "--version"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == f"magicface {magicface_core.__version__}"
    help_text = subprocess.run([sys.executable, "-m", "magicface_core.cli", "generate",
                                "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    for option in ("--steps", "--guidance-scale", "--alpha", "--preset", "--model",
                   "--seed", "--quiet", "--save-maps-every"):
        assert option in help_text
    assert "(default: 50)" in help_text and "(default: 7.5)" in help_text
    assert "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)" in help_text
    assert "example:" in help_text and "reference_prompt=" in help_text


def test_maps_with_a_legend_the_labels_and_every_step(tmp_path):
    maps = tmp_path / "maps.png"
    rc = main(gen("--concept", f"hat={TRIO / 'hat.jpg'},mask={TRIO / 'hat_mask.jpg'}",
                  "--save-maps", str(maps), "--save-maps-every", "1", "--quiet",
                  tmp=tmp_path))
    assert rc == 0
    overlay = np.asarray(Image.open(maps).convert("RGB"))
    assert overlay.shape == (128 + 2 * 16 + 4, 128, 3)
    legend = overlay[128:].reshape(-1, 3)
    for i in range(2):  # each concept's swatch is in the legend
        assert (legend == np.array(concept_color(i))).all(axis=1).any()
    labels = Image.open(tmp_path / "maps_labels.png")
    assert labels.mode == "L" and set(np.unique(np.asarray(labels))) <= {0, 1, 2}
    assert sorted(p.name for p in tmp_path.glob("maps_step*.png")) == [
        "maps_step001.png", "maps_step002.png"]


def test_run_loads_the_model_once_for_many_examples(tmp_path, monkeypatch):
    loads = []
    real = pipeline_module.load_pipeline

    def counting(*a, **k):
        loads.append(a)
        return real(*a, **k)

    monkeypatch.setattr(pipeline_module, "load_pipeline", counting)
    manifest = tmp_path / "more.jsonl"
    data = json.loads((TRIO / "example.json").read_text())
    for c in data["concepts"]:
        for key in ("image", "mask"):
            c[key] = str(TRIO / c[key])
    manifest.write_text(json.dumps({**data, "name": "from-manifest"}) + "\n")
    out = tmp_path / "results"
    rc = main(["run", str(EXAMPLES / "synthetic"), str(TRIO / "example.json"), str(manifest),
               "--out", str(out), "--tiny", "--steps", "2", "--width", "64", "--height", "64",
               "--quiet"])
    assert rc == 0 and len(loads) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 3 and summary["succeeded"] == 3 and summary["failed"] == 0
    assert summary["model"] == "tiny" and summary["seconds_per_image"] > 0
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["synthetic", "trio", "from-manifest"]
    assert all((out / x["image"]).is_file() for x in lines)


def test_run_checks_every_example_before_loading(no_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    data = json.loads((TRIO / "example.json").read_text())
    data["concepts"] = [{**data["concepts"][0], "image": "missing.jpg"}]
    bad.write_text(json.dumps(data) + "\n")
    assert main(["run", str(TRIO), str(bad), "--out", str(tmp_path / "r"), "--tiny"]) == 2
    assert "no such file" in capsys.readouterr().err
