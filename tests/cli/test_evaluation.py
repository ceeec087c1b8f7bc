"""`magicface eval` and `magicface run`: the metrics on random-weight tiny CLIP / DINO /
FaceNet models built from configs, and MTCNN's real (shipped) weights on a real face."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_cli import main
from magicface_cli.evaluation import Evaluator, load_manifest, projected
from magicface_core.models import write_tiny_tokenizer

SYNTHETIC = Path(__file__).resolve().parents[2] / "examples" / "synthetic"


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> dict[str, str]:
    from facenet_pytorch import InceptionResnetV1
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("metric_models")
    torch.manual_seed(0)
    tok_dir = write_tiny_tokenizer(root / "tok")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                        model_max_length=77)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    clip = CLIPModel(CLIPConfig(
        text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 77,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=8))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok).save_pretrained(root / "clip")
    dino = ViTModel(ViTConfig(**small, image_size=32, patch_size=8), add_pooling_layer=False)
    dino.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), root / "facenet.pt")
    return {"clip": str(root / "clip"), "dino": str(root / "dino"),
            "facenet": str(root / "facenet.pt")}


@pytest.fixture(scope="module")
def evaluator(metric_models) -> Evaluator:
    return Evaluator(clip=metric_models["clip"], dino=metric_models["dino"],
                     facenet=metric_models["facenet"])


def astronaut() -> Image.Image:
    # A public-domain NASA portrait shipped inside scikit-image (not in this repository).
    from skimage import data

    return Image.fromarray(data.astronaut())


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metrics_are_the_cosines_of_the_models_embeddings(tmp_path, evaluator):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    gen, ref = tmp_path / "gen.png", tmp_path / "ref.png"
    Image.open(SYNTHETIC / "face.png").save(gen)
    Image.open(SYNTHETIC / "hat.png").save(ref)
    path = write_manifest(tmp_path, [{"image": "gen.png", "prompt": "a man wearing a hat",
                                      "concepts": [{"image": "ref.png"}]}])
    [item] = load_manifest(tmp_path)
    row = evaluator.score(item)
    # The same numbers straight from transformers.
    model = CLIPModel.from_pretrained(evaluator.clip_id)
    proc = CLIPProcessor.from_pretrained(evaluator.clip_id)
    with torch.no_grad():
        px = proc(images=[Image.open(gen).convert("RGB"), Image.open(ref).convert("RGB")],
                  return_tensors="pt")["pixel_values"]
        img = projected(model.get_image_features(pixel_values=px))
        txt = projected(model.get_text_features(**proc(text=["a man wearing a hat"],
                                                        return_tensors="pt")))
        dmodel = AutoModel.from_pretrained(evaluator.dino_id)
        dproc = AutoImageProcessor.from_pretrained(evaluator.dino_id)
        cls = dmodel(pixel_values=dproc(images=[Image.open(gen).convert("RGB"),
                                                Image.open(ref).convert("RGB")],
                                        return_tensors="pt")["pixel_values"]
                     ).last_hidden_state[:, 0]
    cos = torch.nn.functional.cosine_similarity
    assert row["clip_t"] == pytest.approx(float(cos(img[:1], txt)), abs=1e-5)
    assert row["clip_i"] == pytest.approx(float(cos(img[:1], img[1:])), abs=1e-5)
    assert row["dino"] == pytest.approx(float(cos(cls[:1], cls[1:])), abs=1e-5)
    # MTCNN finds the drawn face of the synthetic example; the reference (a hat) has
    # none, so there is nothing to compare it with.
    assert row["face_detected"] is True and row["face"] is None
    assert path.exists()


def test_an_image_against_itself_scores_one(tmp_path, evaluator):
    Image.open(SYNTHETIC / "face.png").save(tmp_path / "a.png")
    write_manifest(tmp_path, [{"image": "a.png", "prompt": "a man",
                               "concepts": [{"image": "a.png"}, {"image": "a.png"}]}])
    row = evaluator.score(load_manifest(tmp_path)[0])
    assert row["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert row["dino"] == pytest.approx(1.0, abs=1e-5)


def test_mtcnn_finds_a_real_face_and_face_similarity_follows_it(tmp_path, evaluator):
    photo = astronaut()
    photo.save(tmp_path / "ref.png")
    photo.save(tmp_path / "same.png")
    # The same person, moved and mirrored: still a face, a different crop.
    moved = Image.new("RGB", photo.size, (30, 30, 30))
    moved.paste(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((400, 400)), (90, 60))
    moved.save(tmp_path / "moved.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    rows = [{"image": name, "prompt": "an astronaut", "name": name.split(".")[0],
             "concepts": [{"image": "ref.png", "face": True}]}
            for name in ("same.png", "moved.png", "n.png")]
    write_manifest(tmp_path, rows)
    mtcnn, _ = evaluator.face
    boxes, probs = mtcnn.detect(photo)
    assert boxes is not None and probs[0] > 0.99  # the shipped MTCNN weights work
    x0, y0, x1, y1 = boxes[0]
    assert 150 < (x0 + x1) / 2 < 300 and 50 < (y0 + y1) / 2 < 200  # her face, top centre
    report = evaluator.evaluate(load_manifest(tmp_path))
    same, moved_row, noise = report.rows
    assert same["face"] == pytest.approx(1.0, abs=1e-5)
    # Random FaceNet weights barely tell faces apart, but the number is the cosine of
    # its embeddings of MTCNN's crops, and another crop is another number.
    _, net = evaluator.face
    with torch.no_grad():
        crops = [mtcnn(Image.open(tmp_path / n).convert("RGB")) for n in ("moved.png", "ref.png")]
        emb = net(torch.stack(crops))
    want = float(torch.nn.functional.cosine_similarity(emb[:1], emb[1:]))
    assert moved_row["face_detected"] and moved_row["face"] == pytest.approx(want, abs=1e-6)
    assert moved_row["face"] < same["face"]
    assert noise["face_detected"] is False and noise["face"] is None
    means = report.means()
    assert means["face_detected"] == pytest.approx(2 / 3)
    assert means["face"] == pytest.approx((same["face"] + moved_row["face"]) / 2)
    assert "| same |" in report.table() and "| **mean** |" in report.table()


def test_manifest_errors_name_the_line_and_field(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    cases = [("{not json", "line 1: not JSON"),
             ('{"prompt": "x", "concepts": []}', "line 1: missing 'image'"),
             ('{"image": "a.png", "prompt": "x", "concepts": [3]}', "'concepts' must be"),
             ('{"image": "b.png", "prompt": "x", "concepts": []}', "b.png does not exist")]
    for text, message in cases:
        (tmp_path / "manifest.jsonl").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            load_manifest(tmp_path / "manifest.jsonl")
    with pytest.raises(ValueError, match="not a JSON-lines manifest"):
        load_manifest(tmp_path / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no results.jsonl or manifest.jsonl"):
        load_manifest(empty)
    with pytest.raises(ValueError, match="metrics must be"):
        Evaluator(["clip_t", "fid"])


def test_run_then_eval_from_the_command_line(tmp_path, metric_models, monkeypatch, capsys):
    from magicface_core import MagicFacePipeline

    second = tmp_path / "examples" / "second"
    shutil.copytree(SYNTHETIC, second)
    data = json.loads((second / "example.json").read_text())
    data["seed"], data["concepts"][0]["face"] = 7, True
    (second / "example.json").write_text(json.dumps(data))
    loads = []
    real = MagicFacePipeline.tiny.__func__
    monkeypatch.setattr(MagicFacePipeline, "tiny",
                        classmethod(lambda cls, **kw: loads.append(1) or real(cls, **kw)))
    out = tmp_path / "results"
    assert main(["run", str(SYNTHETIC), str(second), "--tiny", "--steps", "2",
                 "--out", str(out)]) == 0
    assert loads == [1]  # one model load for both examples
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["synthetic", "second"]
    assert [x["seed"] for x in lines] == [1234, 7]  # each example's own seed
    assert all((out / x["image"]).is_file() for x in lines)
    items = load_manifest(out)
    assert items[0].references[0].resolve() == (SYNTHETIC / "face.png").resolve()
    assert items[1].face_reference.resolve() == (second / "face.png").resolve()

    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--clip-model", metric_models["clip"], "--dino-model",
                 metric_models["dino"], "--face-model", metric_models["facenet"],
                 "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| synthetic |" in printed and "clip_t" in printed
    got = json.loads(report.read_text())
    assert got["count"] == 2 and set(got["means"]) >= {"clip_t", "clip_i", "dino", "face"}
    assert got["models"]["clip"] == metric_models["clip"]
    assert all(-1 <= r["clip_t"] <= 1 for r in got["items"])
    assert main(["eval", str(out), "--metrics", "clip_t,fid"]) == 2
    assert main(["run", str(tmp_path / "nowhere"), "--tiny", "--out", str(out)]) == 2
