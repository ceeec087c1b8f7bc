"""`magicface generate`: every bad input fails with status 2 and one line naming it
before any model loads; the help shows every default; the offline hint comes at once;
`--save-maps` writes the overlay with a legend, the label map and the per-step maps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import magicface_core
import magicface_core.pipeline as pipeline_module
from magicface_cli import main, model_source
from magicface_cli.checks import parse_concept
from magicface_core.limits import LIMITS, TEXT_LIMITS
from magicface_core.overlay import concept_color, overlay_semantic_map

from ..helpers.examples import EXAMPLES

TRIO = EXAMPLES / "trio"
ROOT = Path(__file__).resolve().parents[2]
MAN = f"man={TRIO / 'man.jpg'},mask={TRIO / 'man_mask.jpg'}"
HAT = f"hat={TRIO / 'hat.jpg'},mask={TRIO / 'hat_mask.jpg'}"


@pytest.fixture
def no_model(monkeypatch):
    """Any model load is an error: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline_module, "load_pipeline", refuse)
    monkeypatch.setattr(pipeline_module.MagicFacePipeline, "tiny", refuse)
    monkeypatch.setattr(pipeline_module.MagicFacePipeline, "from_pretrained", refuse)


def gen(tmp: Path, *extra: str, out: str | None = None, prompt: str = "a man with a hat",
        concepts: tuple[str, ...] = (MAN,)) -> list[str]:
    """A small, fast generate command line (--tiny, 64x64, 2 steps)."""
    args = ["generate", "--tiny", "--prompt", prompt, "--steps", "2", "--width", "64",
            "--height", "64", "--out", out or str(tmp / "o.png")]
    for c in concepts:
        args += ["--concept", c]
    return [*args, *extra]


def hub(tmp: Path, model: str | None = None) -> list[str]:
    """`gen` with a hub model (or folder) instead of --tiny."""
    argv = [a for a in gen(tmp) if a != "--tiny"]
    return argv if model is None else [*argv, "--model", model]


def test_parse_concept():
    assert parse_concept("man=a.jpg") == {"word": "man", "image": "a.jpg"}
    got = parse_concept("hat=h.png,mask=m.png,weight=2.5,ref=a man, with a hat,box=1:2:30:40")
    assert got == {"word": "hat", "image": "h.png", "mask": "m.png", "weight": 2.5,
                   "reference_prompt": "a man, with a hat", "box": (1.0, 2.0, 30.0, 40.0)}
    assert parse_concept("hat=h.png,reference_prompt=a hat") == parse_concept(
        "hat=h.png,ref=a hat")
    for bad in ("man", "=a.jpg", "man=a.jpg,weight=x", "man=a.jpg,box=1:2", "man=a.jpg,masks=m"):
        with pytest.raises(ValueError, match="--concept"):
            parse_concept(bad)


def test_overlay_tints_only_concept_regions():
    img = Image.new("RGB", (8, 8), (100, 100, 100))
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:2, :2] = 1
    out = np.asarray(overlay_semantic_map(img, labels))
    assert (out[4:, 4:] == 100).all()
    assert not (out[:4, :4] == 100).all()


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(command line, what stderr must name) for each kind of bad input."""
    small = tmp / "small.png"
    Image.new("RGB", (20, 10)).save(small)
    sam = tmp / "sam.pth"
    sam.write_bytes(b"not really")
    n = int(LIMITS["concepts"].high) + 1
    many = [f"{w}={TRIO / 'man.jpg'},mask={TRIO / 'man_mask.jpg'}"
            for w in ("man", "hat", "woman", "girl", "vase", "dog")[:n]]
    return [
        # Files and images.
        (gen(tmp, concepts=(MAN, f"hat={tmp / 'nope.jpg'},mask={TRIO / 'hat_mask.jpg'}")),
         f"--concept hat image: no such file: {tmp / 'nope.jpg'}"),
        (gen(tmp, concepts=(MAN, f"hat={TRIO / 'hat.jpg'},mask={tmp / 'nope.png'}")),
         f"--concept hat mask: no such file: {tmp / 'nope.png'}"),
        (gen(tmp, concepts=(MAN, f"hat={TRIO / 'example.json'},mask={TRIO / 'hat_mask.jpg'}")),
         "--concept hat image: could not decode the image"),
        (gen(tmp, concepts=(MAN, f"hat={TRIO / 'hat.jpg'},mask={TRIO / 'example.json'}")),
         "is not a decodable image"),
        (gen(tmp, concepts=(MAN, f"hat={TRIO / 'hat.jpg'},mask={small}")),
         "--concept hat mask: the mask is 20x10 but its image is"),
        (gen(tmp, concepts=(MAN, f"hat={TRIO / 'hat.jpg'}")),
         "--concept hat mask: no mask, and no --sam-checkpoint"),
        (gen(tmp, "--sam-checkpoint", str(tmp / "sam-missing.pth")),
         "--sam-checkpoint: no such file"),
        (gen(tmp, "--sam-checkpoint", str(sam),
             concepts=(MAN, f"hat={TRIO / 'hat.jpg'},box=0:0:99999:10")),
         "--concept hat box: (0.0, 0.0, 99999.0, 10.0) lies outside the"),
        # Words, concepts and their keys.
        (gen(tmp, concepts=(f"scarf={TRIO / 'hat.jpg'},mask={TRIO / 'hat_mask.jpg'}",)),
         "--concept scarf: concept word 'scarf' does not occur in the prompt"),
        (gen(tmp, concepts=(MAN, MAN.replace("man=", "MAN=", 1))),
         "--concept MAN: the word 'MAN' is used by more than one concept"),
        (gen(tmp, prompt="a man with a hat, a woman, a girl, a vase and a dog",
             concepts=tuple(many)), f"too many concepts: at most {n - 1}, got {n}"),
        (gen(tmp, concepts=(f"{HAT},masks=x.png",)), "unknown key 'masks' (valid keys: mask,"),
        (gen(tmp, concepts=(f"{HAT},weight=25",)), "--concept hat weight must be in (0, 20]"),
        (gen(tmp, concepts=(f"{HAT},weight=0",)), "--concept hat weight must be in (0, 20]"),
        (gen(tmp, concepts=(f"{HAT},ref={'x' * (TEXT_LIMITS['reference_prompt'] + 1)}",)),
         f"--concept hat reference_prompt must be at most "
         f"{TEXT_LIMITS['reference_prompt']} characters"),
        (gen(tmp, prompt=" "), "--prompt must be a non-empty string"),
        # Numbers: the limits table's ranges, named by option.
        (gen(tmp, "--steps", "0"), "--steps must be in [1, 200], got 0"),
        (gen(tmp, "--steps", str(int(LIMITS["steps"].high) + 1)), "--steps must be in"),
        (gen(tmp, "--width", "100"), "--width must be a multiple of 8, got 100"),
        (gen(tmp, "--height", "4096"), "--height must be in [64, 2048]"),
        (gen(tmp, "--alpha", "1.5"), "--alpha must be in [0, 1], got 1.5"),
        (gen(tmp, "--guidance-scale", "nan"), "--guidance-scale must be in [0, 50]"),
        (gen(tmp, "--ca-scale", "0"), "--ca-scale must be in (0, 1]"),
        (gen(tmp, "--seed", "-1"), "--seed must be in"),
        (gen(tmp, "--negative-prompt", "x" * (TEXT_LIMITS["negative_prompt"] + 1)),
         "--negative-prompt must be at most"),
        # Outputs.
        (gen(tmp, out=str(tmp / "o.gif")), "--out: " + str(tmp / "o.gif") +
         " must end in one of .png, .jpg, .jpeg, .webp"),
        (gen(tmp, out=str(tmp / "missing" / "o.png")),
         f"--out: the folder {tmp / 'missing'} does not exist"),
        (gen(tmp, out="/proc/o.png"), "--out: cannot write into /proc"),
        (gen(tmp, "--save-maps", str(tmp / "maps.gif")), "--save-maps: "),
        (gen(tmp, "--save-maps", str(tmp / "missing" / "maps.png")),
         "--save-maps: the folder"),
        (gen(tmp, "--save-maps", str(tmp / "o.png")), "--save-maps: the same file as --out"),
        (gen(tmp, "--save-maps-every", "1"), "--save-maps-every needs --save-maps"),
        (gen(tmp, "--save-maps", str(tmp / "m.png"), "--save-maps-every", "0"),
         "--save-maps-every must be at least 1"),
        # The model's source.
        (hub(tmp, "./no/such/folder"), "--model ./no/such/folder: no such folder"),
        (hub(tmp, str(tmp)), "not a diffusers Stable Diffusion folder (no unet, vae"),
    ]


def test_every_bad_input_fails_before_any_model(no_model, tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path):
        if argv[0] != "generate":
            argv = ["generate", *argv]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert err.startswith("magicface: error: ") and err.count("\n") == 1, err  # one line
        assert not (tmp_path / "o.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam.pth", "small.png"]


def test_bad_input_needs_no_torch_and_the_offline_hint_comes_at_once(tmp_path):
    """In a fresh interpreter: the checks and the offline hint import neither torch nor
    diffusers (so they take well under a second, not a model load or 30 s of retries)."""
    probe = ("import sys; from magicface_cli import main; rc = main(sys.argv[1:]); "
             "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules)); "
             "sys.exit(rc)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cases = [
        (gen(tmp_path, "--steps", "0"), "--steps must be in"),
        (hub(tmp_path, "magicface-tests/no-such"),
         "--model magicface-tests/no-such: not in the local Hugging Face cache, and "
         "HF_HUB_OFFLINE is set; use --tiny (random weights, no download) or --model "
         "/path/to/local/diffusers/folder"),
    ]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stdout.strip() == "[]"


def test_offline_hint_for_an_unreachable_hub(no_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_source, "hub_reachable", lambda *a, **k: False)
    assert main(hub(tmp_path)) == 2  # the default model
    err = capsys.readouterr().err
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5: not in the local Hugging Face cache" in err
    assert "cannot be reached; use --tiny" in err and "/path/to/local/diffusers/folder" in err


def test_a_failed_download_gives_the_hint(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore text")

    monkeypatch.setattr(model_source, "hub_reachable", lambda *a, **k: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pipeline_module, "load_pipeline", offline)
    assert main(hub(tmp_path, "magicface-tests/gone")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("magicface: error: --model magicface-tests/gone: could not be "
                              "loaded (We couldn't connect to 'https://huggingface.co'); use "
                              "--tiny")
    assert len(err) == 2 and err[0] == "loading magicface-tests/gone ..."


def test_a_cached_hub_model_loads_from_its_snapshot_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    from magicface_core import MagicFacePipeline

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--cached" / "snapshots" / "abc123"
    MagicFacePipeline.tiny().save_pretrained(snapshot)
    (cache / "models--someone--cached" / "refs").mkdir()
    (cache / "models--someone--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loads = []
    real = pipeline_module.load_pipeline
    monkeypatch.setattr(pipeline_module, "load_pipeline",
                        lambda model, **k: loads.append(model) or real(model, **k))
    assert main(hub(tmp_path, "someone/cached")) == 0
    assert loads == [str(snapshot)]  # the folder: no hub call at all
    assert "loading someone/cached (from " in capsys.readouterr().err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"magicface {magicface_core.__version__}"
    required = {"generate": {"--prompt", "--out"}, "run": {"--out"}, "eval": set()}
    for command, needed in required.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "example:" in text and f"magicface {command}" in text.split("example:")[1]
        assert "(default: None)" not in text and "(default: [])" not in text
        options = text.split("options:")[1].split("\n\n")[0]
        entries = re.split(r"\n(?=  -)", options.strip("\n"))
        names = set()
        for entry in entries:
            name = entry.split()[0].rstrip(",")
            names.add(name)
            if name == "-h":
                continue
            words = " ".join(entry.split())
            assert len(words.split()) > 3, f"{command} {name} has no help"
            if name not in needed:
                assert "(default: " in words, f"{command} {name} shows no default: {words}"
        assert needed <= names
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--steps STEPS DDIM steps, [1, 200] (default: 50)",
                  "(default: 7.5)", "(default: 0.4)", "(default: authors)",
                  "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)",
                  "(default: 512; 128 with --tiny)", "reference_prompt=", "ref= is short"):
        assert shown in text, shown


def test_generate_with_maps_legend_labels_and_every_step(tmp_path, capsys):
    out, maps = tmp_path / "out.png", tmp_path / "maps.png"
    rc = main(gen(tmp_path, "--save-maps", str(maps), "--save-maps-every", "1",
                  "--seed", "4", out=str(out), concepts=(f"{MAN},weight=2.5,ref=a man", HAT)))
    assert rc == 0
    assert Image.open(out).size == (64, 64)
    overlay = np.asarray(Image.open(maps).convert("RGB"))
    assert overlay.shape[1] == 64 and overlay.shape[0] > 64  # the legend strip below
    legend = overlay[64:].reshape(-1, 3)
    for i in range(2):  # each concept's swatch, in its colour
        assert (legend == np.array(concept_color(i))).all(axis=1).any()
    labels = Image.open(tmp_path / "maps_labels.png")
    assert labels.mode == "L" and set(np.unique(np.asarray(labels))) <= {0, 1, 2}
    assert labels.size == (4, 4)  # the map's grid: 64 px / VAE 8 / map_downscale 2
    steps = sorted(p.name for p in tmp_path.glob("maps_step*.png"))
    assert steps == ["maps_step001.png", "maps_step002.png"]  # one per step
    assert Image.open(tmp_path / steps[0]).size == Image.open(maps).size
    captured = capsys.readouterr()
    assert "random weights" in captured.err and "references" in captured.err
    assert "sampling" in captured.err and "loaded tiny" in captured.err
    assert f"wrote {maps}" in captured.out


def test_quiet_prints_no_progress(tmp_path, capsys):
    assert main(gen(tmp_path, "--quiet")) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip() == f"wrote {tmp_path / 'o.png'}"


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "magicface_cli", "generate", "--tiny", "--prompt",
         "a man", "--steps", "2", "--concept",
         f"scarf={TRIO / 'man.jpg'},mask={TRIO / 'man_mask.jpg'}",
         "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "concept word 'scarf' does not occur" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_fold_bias_gives_the_same_image(tmp_path):
    outs = []
    for extra in ([], ["--no-fold-bias"]):
        out = tmp_path / f"out{len(extra)}.png"
        rc = main(gen(tmp_path, "--seed", "2", "--steps", "3", "--width", "128", "--height",
                      "128", *extra, out=str(out), concepts=(MAN, HAT)))
        assert rc == 0
        outs.append(np.asarray(Image.open(out)).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1


def test_cli_preset_and_ca_scale(tmp_path):
    images = {}
    for name, extra in {"authors": [], "paper": ["--preset", "paper"],
                        "ca": ["--ca-scale", "1.0"]}.items():
        out = tmp_path / f"{name}.png"
        argv = gen(tmp_path, "--seed", "2", "--steps", "3", "--width", "128", "--height", "128",
                   *extra, out=str(out), concepts=(MAN, HAT))
        assert main(argv) == 0
        images[name] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(images["authors"] - images["paper"]).max() > 10
    assert np.abs(images["authors"] - images["ca"]).max() > 0
    assert main(gen(tmp_path, "--ca-scale", "1.5", out=str(tmp_path / "x.png"))) == 2
    assert not (tmp_path / "x.png").exists()
