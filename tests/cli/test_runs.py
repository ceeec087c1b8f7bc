"""`magicface run`: example folders, example.json files and .jsonl manifests, all
checked before the model loads (a bad one names its file and field), one model load for
all, then the images, results.jsonl and summary.json in the results folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import magicface_core.pipeline as pipeline_module
from magicface_cli import main

from ..helpers.examples import EXAMPLES

SYNTHETIC, TRIO = EXAMPLES / "synthetic", EXAMPLES / "trio"
FAST = ["--tiny", "--steps", "2", "--width", "64", "--height", "64", "--quiet"]


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every model load, counted (the real tiny model is returned)."""
    seen: list[str] = []
    real = pipeline_module.load_pipeline

    def counting(model, **kw):
        seen.append(model)
        return real(model, **kw)

    monkeypatch.setattr(pipeline_module, "load_pipeline", counting)
    return seen


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before every example was checked")

    monkeypatch.setattr(pipeline_module, "load_pipeline", refuse)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_two_examples_one_model_load(tmp_path, loads, capsys):
    out = tmp_path / "results"
    assert main(["run", str(SYNTHETIC), str(TRIO / "example.json"), "--out", str(out),
                 *FAST]) == 0
    assert loads == ["tiny"]  # one load for both
    lines = read_lines(out / "results.jsonl")
    assert [x["name"] for x in lines] == ["synthetic", "trio"]
    assert [x["seed"] for x in lines] == [1234, 4242]  # each example's own seed
    assert all((out / x["image"]).is_file() for x in lines)
    assert (out / lines[1]["concepts"][2]["mask"]).resolve() == TRIO / "sunglasses_mask.jpg"
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in ("count", "succeeded", "failed", "model", "preset")} == {
        "count": 2, "succeeded": 2, "failed": 0, "model": "tiny", "preset": "authors"}
    assert set(summary["per_image_seconds"]) == {"synthetic", "trio"}
    assert summary["total_seconds"] >= sum(summary["per_image_seconds"].values()) > 0
    assert summary["seconds_per_image"] > 0 and summary["load_seconds"] > 0
    assert summary["failures"] == []
    assert "wrote 2 of 2 images" in capsys.readouterr().out


def test_a_manifest_and_maps(tmp_path, loads):
    # A manifest beside copied images: its paths are relative to it.
    data = tmp_path / "data"
    shutil.copytree(SYNTHETIC, data)
    example = json.loads((SYNTHETIC / "example.json").read_text())
    lines = [{**example, "name": "first", "seed": 3},
             {**example, "concepts": example["concepts"][:1]}]
    manifest = data / "batch.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "results"
    assert main(["run", str(manifest), "--out", str(out), "--save-maps",
                 "--save-maps-every", "2", "--seed", "9", *FAST]) == 0
    assert loads == ["tiny"]
    got = read_lines(out / "results.jsonl")
    assert [(x["name"], x["line"], x["seed"]) for x in got] == [
        ("first", 1, 9), ("batch-2", 2, 9)]  # --seed overrides every example's
    assert got[0]["example"] == "../data/batch.jsonl"
    for name in ("first", "batch-2"):
        for suffix in (".png", "_maps.png", "_maps_labels.png", "_maps_step002.png"):
            assert (out / f"{name}{suffix}").is_file(), name + suffix
    assert got[0]["maps"] == "first_maps.png" and got[0]["labels"] == "first_maps_labels.png"


def test_a_failed_example_is_counted_and_the_rest_go_on(tmp_path, monkeypatch):
    real = pipeline_module.load_pipeline

    def flaky(model, **kw):
        pipe = real(model, **kw)
        generate = pipe.generate

        def maybe(prompt, *a, **k):
            if "sunglasses" in prompt:
                raise RuntimeError("out of memory (pretend)")
            return generate(prompt, *a, **k)

        pipe.generate = maybe
        return pipe

    monkeypatch.setattr(pipeline_module, "load_pipeline", flaky)
    out = tmp_path / "results"
    assert main(["run", str(TRIO), str(SYNTHETIC), "--out", str(out), *FAST]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["succeeded"], summary["failed"]) == (1, 1)
    assert summary["failures"][0]["name"] == "trio"
    assert "out of memory" in summary["failures"][0]["error"]
    assert [x["name"] for x in read_lines(out / "results.jsonl")] == ["synthetic"]


def _with(change) -> dict:
    data = json.loads((SYNTHETIC / "example.json").read_text())
    for c in data["concepts"]:
        for key in ("image", "mask"):
            c[key] = str(SYNTHETIC / c[key])
    change(data)
    return data


BAD_EXAMPLES = [
    (lambda d: d["concepts"][1].update(image="missing.png"), "concepts[1].image: no such file"),
    (lambda d: d["concepts"][0].update(masks="x.png"),
     "concepts[0]: unknown key 'masks' (valid keys: word, image, mask"),
    (lambda d: d["concepts"][0].update(word="woman"),
     "concepts[0].word: concept word 'woman' does not occur in the prompt"),
    (lambda d: d["concepts"][1].update(word="Man"), "concepts[1].word: the word 'Man' is used"),
    (lambda d: d["concepts"][0].update(weight=50), "concepts[0].weight must be in (0, 20]"),
    (lambda d: d["concepts"][0].update(mask=d["concepts"][1]["image"]),
     "concepts[0].mask: the mask is"),
    (lambda d: d["concepts"][0].pop("image"), "concepts[0].image: missing"),
    (lambda d: d.pop("prompt"), "prompt: missing"),
    (lambda d: d.update(seed="one"), "seed must be a number"),
    (lambda d: d.update(concepts=d["concepts"] * 3), "concepts: too many concepts: at most"),
    (lambda d: d.update(name="../escape"), "name: '../escape' cannot name a file"),
]


@pytest.mark.parametrize("change,message", BAD_EXAMPLES)
def test_a_bad_example_fails_before_the_model(no_model, tmp_path, capsys, change, message):
    manifest = tmp_path / "batch.jsonl"
    good = _with(lambda d: None)
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(_with(change)) + "\n")
    out = tmp_path / "results"
    assert main(["run", str(SYNTHETIC), str(manifest), "--out", str(out), "--tiny"]) == 2
    err = capsys.readouterr().err
    assert f"{manifest} line 2: {message}" in err, err
    assert err.count("\n") == 1 and not out.exists()


def test_bad_files_and_names(no_model, tmp_path, capsys):
    broken = tmp_path / "broken" / "example.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text("[1, 2]\n")
    twin = tmp_path / "twin"
    shutil.copytree(SYNTHETIC, twin / "synthetic")
    for argv, message in [
        ([str(broken)], f"{broken}: not an example.json (not JSON"),
        ([str(bad_line)], f"{bad_line} line 1: must be a JSON object"),
        ([str(tmp_path / "nowhere")], "nowhere: no such file or folder"),
        ([str(SYNTHETIC), str(twin)], "name: 'synthetic' is also the name of"),
        ([str(SYNTHETIC), "--out", "/proc/results"], "--out: cannot write into /proc"),
    ]:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "r")]
        assert main(["run", *argv, "--tiny"]) == 2
        err = capsys.readouterr().err
        assert message in err, (message, err)
