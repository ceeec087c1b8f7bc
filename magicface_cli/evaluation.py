"""Quality metrics of customized images, as papers in this field report them.

- CLIP-T: cosine of CLIP's image embedding of the result and its text embedding of the
  prompt (prompt fidelity).
- CLIP-I: cosine of CLIP image embeddings, result vs each concept's reference image,
  averaged over the concepts (concept fidelity).
- DINO: the same with DINO's [CLS] embedding (fine-grained concept fidelity).
- face: cosine of FaceNet embeddings of the largest face MTCNN finds in the result and
  in the identity reference (identity fidelity); a result without a detectable face
  scores nothing and counts against the detection rate.

Inputs are a results manifest (JSON lines, see `load_manifest`). Each metric model
loads from a hub id or a local folder (FaceNet: facenet-pytorch's pretrained names,
or a state-dict file), once per `Evaluator`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["METRICS", "EvalItem", "EvalReport", "Evaluator", "load_manifest", "report_json",
           "MANIFEST_NAMES", "DEFAULT_CLIP", "DEFAULT_DINO", "DEFAULT_FACENET"]

METRICS = ("clip_t", "clip_i", "dino", "face")
# Manifests a results folder may hold (`magicface run` writes results.jsonl).
MANIFEST_NAMES = ("results.jsonl", "manifest.jsonl")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_FACENET = "vggface2"  # facenet-pytorch's InceptionResnetV1 weights


@dataclass
class EvalItem:
    """One generated image and what it is measured against."""

    name: str
    image: Path
    prompt: str
    references: list[Path]  # one reference image per concept
    face_reference: Path | None = None  # the identity reference, if any


@dataclass
class EvalReport:
    rows: list[dict] = field(default_factory=list)  # one per item: name and metric values

    def means(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for m in METRICS:
            vals = [r[m] for r in self.rows if r.get(m) is not None]
            if any(m in r for r in self.rows):
                out[m] = sum(vals) / len(vals) if vals else None
        if any("face" in r for r in self.rows):
            out["face_detected"] = sum(bool(r.get("face_detected")) for r in self.rows) / max(
                1, len(self.rows))
        return out

    def to_json(self) -> dict:
        return {"count": len(self.rows), "means": self.means(), "items": self.rows}

    def table(self) -> str:
        means = self.means()
        cols = [m for m in (*METRICS, "face_detected") if m in means]
        lines = ["| item | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]

        def fmt(v: float | bool | None) -> str:
            if isinstance(v, bool):
                return "yes" if v else "no"
            return "-" if v is None else f"{v:.4f}"

        for r in self.rows:
            lines.append(f"| {r['name']} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        lines.append("| **mean** | " + " | ".join(fmt(means[c]) for c in cols) + " |")
        return "\n".join(lines)


def _resolve(base: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else base / path


def load_manifest(path: str | Path) -> list[EvalItem]:
    """Items from a JSON-lines manifest, or a folder holding one (results.jsonl or
    manifest.jsonl). Each line: {"image", "prompt", "concepts": [{"image", ...,
    "face": true?}], "name"?}. Paths are relative to the manifest's folder. The
    identity reference is the concept marked "face", else the first concept.
    Raises ValueError naming the line and field of anything missing."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in MANIFEST_NAMES if (path / n).is_file()]
        if not found:
            raise ValueError(f"{path}: no {' or '.join(MANIFEST_NAMES)} in this folder")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"{path}: no such manifest")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON-lines manifest") from None
    base, items = path.parent, []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        for key in ("image", "prompt", "concepts"):
            if key not in rec:
                raise ValueError(f"{where}: missing '{key}'")
        concepts = rec["concepts"]
        if not isinstance(concepts, list) or not all(
                isinstance(c, dict) and "image" in c for c in concepts):
            raise ValueError(f"{where}: 'concepts' must be a list of objects with 'image'")
        refs = [_resolve(base, c["image"]) for c in concepts]
        faces = [r for c, r in zip(concepts, refs, strict=True) if c.get("face")]
        item = EvalItem(name=str(rec.get("name", Path(rec["image"]).stem)),
                        image=_resolve(base, rec["image"]), prompt=str(rec["prompt"]),
                        references=refs,
                        face_reference=faces[0] if faces else (refs[0] if refs else None))
        for p in [item.image, *refs]:
            if not p.is_file():
                raise ValueError(f"{where}: {p} does not exist")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: the manifest lists no images")
    return items


def projected(out: Any) -> torch.Tensor:
    """CLIP's projected embedding: transformers 5 returns it as the output's
    `pooler_output`, earlier releases as a bare tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten()[None], b.float().flatten()[None]))


class Evaluator:
    """Loads the metric models once and scores items.

    `clip`, `dino`: hub ids or local folders (transformers); `facenet`: a
    facenet-pytorch pretrained name ("vggface2", "casia-webface") or a state-dict file.
    Models load on first use, so asking only for CLIP-T loads only CLIP.
    """

    def __init__(self, metrics: Sequence[str] = METRICS, *, clip: str = DEFAULT_CLIP,
                 dino: str = DEFAULT_DINO, facenet: str = DEFAULT_FACENET,
                 device: str | torch.device = "cpu", local_files_only: bool | None = None):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"metrics must be some of {', '.join(METRICS)}, got "
                             f"{', '.join(unknown) or 'none'}")
        self.metrics = tuple(metrics)
        self.clip_id, self.dino_id, self.facenet_id = clip, dino, facenet
        self.device = torch.device(device)
        self.local_files_only = local_files_only
        self._clip = self._dino = self._face = None
        self._cache: dict[tuple[str, Path], torch.Tensor | None] = {}

    # -- models -----------------------------------------------------------------------
    def _kw(self, model_id: str) -> dict:
        local = Path(model_id).expanduser().is_dir()
        only = self.local_files_only if self.local_files_only is not None else local
        return {"local_files_only": only}

    @property
    def clip(self) -> tuple[Any, Any]:
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(self.clip_id, **self._kw(self.clip_id))
            proc = CLIPProcessor.from_pretrained(self.clip_id, **self._kw(self.clip_id))
            self._clip = (model.to(self.device).eval(), proc)
        return self._clip

    @property
    def dino(self) -> tuple[Any, Any]:
        if self._dino is None:
            from transformers import AutoImageProcessor, AutoModel

            model = AutoModel.from_pretrained(self.dino_id, **self._kw(self.dino_id))
            proc = AutoImageProcessor.from_pretrained(self.dino_id, **self._kw(self.dino_id))
            self._dino = (model.to(self.device).eval(), proc)
        return self._dino

    @property
    def face(self) -> tuple[Any, Any]:
        if self._face is None:
            try:
                from facenet_pytorch import MTCNN, InceptionResnetV1
            except ImportError as e:
                raise ImportError(
                    "the face metric needs facenet-pytorch: pip install --no-deps "
                    "facenet-pytorch==2.6.0 (its metadata pins an old torch; the code runs "
                    "on current ones)") from e
            path = Path(self.facenet_id).expanduser()
            if path.is_file():
                net = InceptionResnetV1(pretrained=None)
                state = torch.load(path, map_location="cpu", weights_only=True)
                state = {k: v for k, v in state.items() if not k.startswith("logits.")}
                net.load_state_dict(state)
            else:
                net = InceptionResnetV1(pretrained=self.facenet_id)
            # MTCNN's own weights ship inside facenet-pytorch.
            mtcnn = MTCNN(image_size=160, margin=0, select_largest=True, device=self.device)
            self._face = (mtcnn, net.to(self.device).eval())
        return self._face

    # -- embeddings -------------------------------------------------------------------
    @staticmethod
    def _open(path: Path) -> Image.Image:
        with Image.open(path) as img:
            return img.convert("RGB")

    def _memo(self, kind: str, path: Path,
              fn: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        key = (kind, path.resolve())
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @torch.no_grad()
    def clip_image(self, path: Path) -> torch.Tensor:
        def run() -> torch.Tensor:
            model, proc = self.clip
            px = proc(images=self._open(path), return_tensors="pt")["pixel_values"]
            return projected(model.get_image_features(pixel_values=px.to(self.device)))[0]
        return self._memo("clip", path, run)

    @torch.no_grad()
    def clip_text(self, prompt: str) -> torch.Tensor:
        model, proc = self.clip
        tok = proc(text=[prompt], return_tensors="pt", padding=True, truncation=True)
        return projected(model.get_text_features(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device)))[0]

    @torch.no_grad()
    def dino_image(self, path: Path) -> torch.Tensor:
        def run() -> torch.Tensor:
            model, proc = self.dino
            px = proc(images=self._open(path), return_tensors="pt")["pixel_values"]
            return model(pixel_values=px.to(self.device)).last_hidden_state[0, 0]  # [CLS]
        return self._memo("dino", path, run)

    @torch.no_grad()
    def face_embedding(self, path: Path) -> torch.Tensor | None:
        def run() -> torch.Tensor | None:
            mtcnn, net = self.face
            crop = mtcnn(self._open(path))  # the largest face, 160 x 160, or None
            return None if crop is None else net(crop[None].to(self.device))[0]
        return self._memo("face", path, run)

    # -- scoring ----------------------------------------------------------------------
    def score(self, item: EvalItem) -> dict:
        row: dict = {"name": item.name, "image": str(item.image)}
        if "clip_t" in self.metrics:
            row["clip_t"] = _cos(self.clip_image(item.image), self.clip_text(item.prompt))
        if "clip_i" in self.metrics:
            sims = [_cos(self.clip_image(item.image), self.clip_image(r))
                    for r in item.references]
            row["clip_i"] = sum(sims) / len(sims) if sims else None
        if "dino" in self.metrics:
            sims = [_cos(self.dino_image(item.image), self.dino_image(r))
                    for r in item.references]
            row["dino"] = sum(sims) / len(sims) if sims else None
        if "face" in self.metrics:
            gen = self.face_embedding(item.image)
            ref = (self.face_embedding(item.face_reference)
                   if item.face_reference is not None else None)
            row["face_detected"] = gen is not None
            row["face"] = _cos(gen, ref) if gen is not None and ref is not None else None
        return row

    def evaluate(self, items: Iterable[EvalItem],
                 progress: Callable[[EvalItem], None] | None = None) -> EvalReport:
        report = EvalReport()
        for item in items:
            report.rows.append(self.score(item))
            if progress is not None:
                progress(item)
        return report


def report_json(report: EvalReport, evaluator: Evaluator) -> dict:
    """The report with the models it was measured with."""
    return {**report.to_json(), "models": {"clip": evaluator.clip_id, "dino": evaluator.dino_id,
                                           "facenet": evaluator.facenet_id},
            "metrics": list(evaluator.metrics)}
