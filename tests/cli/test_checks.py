"""The command line's pre-load checks (magicface_cli.checks and .model_source) as
functions: the concept specs, the gateway's word rule, images and masks as the library
sees them, the output paths, and where a model will come from. No model is involved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from magicface_cli import model_source
from magicface_cli.checks import (
    check_concepts,
    check_image_output,
    check_writable_folder,
    parse_concept,
)
from magicface_cli.model_source import ModelUnavailable, locate_model
from magicface_core import MagicFaceInputError

from ..helpers.images import mask_image, noise_image

EXIF_ORIENTATION = 0x0112


def label(i: int, field: str) -> str:
    return f"concepts[{i}]" + (f".{field}" if field else "")


def test_parse_concept_keys_aliases_and_text():
    assert parse_concept("hat=h.png,reference_prompt=a hat, red") == {
        "word": "hat", "image": "h.png", "reference_prompt": "a hat, red"}
    assert parse_concept("hat=h.png,ref=a hat")["reference_prompt"] == "a hat"
    # Quoted text keeps a key=value inside it; a quoted path keeps its comma.
    assert parse_concept('hat="h,1.png",ref="style=anime, red"') == {
        "word": "hat", "image": "h,1.png", "reference_prompt": "style=anime, red"}
    with pytest.raises(ValueError, match=r"unknown key 'wieght' \(valid keys: mask, weight, "
                                         r"reference_prompt, box, ref"):
        parse_concept("hat=h.png,wieght=2")
    # An unknown key after free text is still an error, not more text.
    with pytest.raises(ValueError, match="unknown key 'masks'"):
        parse_concept("hat=h.png,ref=a hat,masks=m.png")
    with pytest.raises(ValueError, match="reference_prompt is given twice"):
        parse_concept("hat=h.png,ref=a,reference_prompt=b")


def test_mask_size_is_compared_after_exif_orientation(tmp_path):
    noise_image(1, (40, 30)).save(tmp_path / "img.png")
    # The mask stored 30x40 but tagged "rotate 90": displayed 40x30, like its image.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    mask_image((30, 40)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    mask_image((30, 40)).save(tmp_path / "plain.jpg")
    ok = {"word": "man", "image": str(tmp_path / "img.png"), "mask": str(tmp_path / "turned.jpg")}
    check_concepts("a man", [ok], label)
    with pytest.raises(MagicFaceInputError, match=r"concepts\[0\]\.mask: the mask is 30x40 "
                                                  r"but its image is 40x30"):
        check_concepts("a man", [{**ok, "mask": str(tmp_path / "plain.jpg")}], label)


def test_concepts_without_a_mask_need_sam_and_a_box_inside(tmp_path):
    noise_image(1, (40, 30)).save(tmp_path / "img.png")
    spec = {"word": "man", "image": str(tmp_path / "img.png")}
    with pytest.raises(MagicFaceInputError, match="no mask, and no --sam-checkpoint"):
        check_concepts("a man", [spec], label)
    check_concepts("a man", [spec], label, sam_checkpoint="sam.pth")
    with pytest.raises(MagicFaceInputError, match=r"concepts\[0\]\.box: .* lies outside the "
                                                  r"40x30 image"):
        check_concepts("a man", [{**spec, "box": (0, 0, 50, 10)}], label, "sam.pth")


def test_output_paths(tmp_path):
    check_image_output(tmp_path / "a.webp", "--out")
    with pytest.raises(MagicFaceInputError, match=r"--out: .*a\.gif must end in one of"):
        check_image_output(tmp_path / "a.gif", "--out")
    with pytest.raises(MagicFaceInputError, match="--out: the folder .*nope does not exist"):
        check_image_output(tmp_path / "nope" / "a.png", "--out")
    with pytest.raises(MagicFaceInputError, match="--out: cannot write into /proc"):
        check_image_output(Path("/proc/a.png"), "--out")
    assert not list(tmp_path.iterdir())  # the write probe leaves nothing behind
    check_writable_folder(tmp_path / "results" / "deeper", "--out")  # made on use
    (tmp_path / "file").write_text("x")
    with pytest.raises(MagicFaceInputError, match="exists and is not a folder"):
        check_writable_folder(tmp_path / "file", "--out")


def fake_hub_cache(root: Path, repo_id: str) -> Path:
    """The Hugging Face cache layout with the five components' configs of `repo_id`."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    for name in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(json.dumps({}))
    return snapshot


def test_locate_model(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert locate_model("anything", tiny=True).path == "tiny"
    with pytest.raises(MagicFaceInputError, match="no such folder"):
        locate_model("./no/such/folder")
    with pytest.raises(MagicFaceInputError, match=r"not a diffusers .* \(no unet, vae"):
        locate_model(str(tmp_path))
    # In the cache: its snapshot folder, even offline (no network needed).
    snapshot = fake_hub_cache(tmp_path / "hub", "someone/cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = locate_model("someone/cached")
    assert (Path(src.path), src.name, src.download) == (snapshot, "someone/cached", False)
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set; use --tiny"):
        locate_model("someone/not-cached")
    # Online but the hub does not answer: the hint at once, not 30 s of retries.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(model_source, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelUnavailable, match="cannot be reached; use --tiny .* --model "
                                               "/path/to/local/diffusers/folder"):
        locate_model("someone/not-cached")
    monkeypatch.setattr(model_source, "hub_reachable", lambda *a, **k: True)
    assert locate_model("someone/not-cached").download


def test_hub_probe_trusts_a_proxy_and_reads_hf_endpoint(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert model_source.hub_reachable(timeout=0.1)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert not model_source.hub_reachable(timeout=0.5)
