"""`magicface generate | run | eval`: the method, batches of examples and their metrics
from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .overlay import overlay_semantic_map

__all__ = ["main", "parse_concept", "overlay_semantic_map"]

_CONCEPT_KEYS = ("mask", "weight", "ref", "box")



def parse_concept(spec: str) -> dict:
    """`word=IMAGE[,mask=MASK][,weight=W][,ref=TEXT][,box=x0:y0:x1:y1]` -> fields.

    A comma inside `ref=` text is kept: a piece that does not start with a known
    key belongs to the piece before it.
    """
    pieces: list[str] = []
    for part in spec.split(","):
        key = part.split("=", 1)[0].strip()
        if pieces and (("=" not in part) or key not in _CONCEPT_KEYS):
            pieces[-1] += "," + part
        else:
            pieces.append(part)
    head, *rest = pieces
    if "=" not in head:
        raise ValueError(f"--concept {spec!r}: expected word=IMAGE first")
    word, image = (s.strip() for s in head.split("=", 1))
    if not word or not image:
        raise ValueError(f"--concept {spec!r}: expected word=IMAGE first")
    out: dict = {"word": word, "image": image}
    for part in rest:
        key, value = (s.strip() for s in part.split("=", 1))
        if key == "weight":
            try:
                out["weight"] = float(value)
            except ValueError:
                raise ValueError(f"--concept {spec!r}: weight must be a number") from None
        elif key == "ref":
            out["reference_prompt"] = value.strip("\"'")
        elif key == "box":
            try:
                box = tuple(float(x) for x in value.split(":"))
            except ValueError:
                raise ValueError(f"--concept {spec!r}: box must be x0:y0:x1:y1") from None
            if len(box) != 4:
                raise ValueError(f"--concept {spec!r}: box must be x0:y0:x1:y1")
            out["box"] = box
        else:
            out[key] = value
    return out


def _model_options(g: argparse.ArgumentParser) -> None:
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                     help="diffusers checkpoint: hub id or local folder")
    src.add_argument("--tiny", action="store_true",
                     help="random-weight tiny model (no download; the output is noise)")
    g.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available)")
    g.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (slow first image; falls back to eager)")
    g.add_argument("--fold-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="carry the RSA/RBA bias in extra head dims (mask-free SDPA); "
                        "--no-fold-bias passes it as a dense SDPA mask")


def _sampling_options(g: argparse.ArgumentParser, seed_default: int | None) -> None:
    g.add_argument("--seed", type=int, default=seed_default)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--alpha", type=float, default=0.4)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--preset", choices=("authors", "paper"), default="authors",
                   help="authors: what the authors' code computes (the published images); "
                        "paper: the paper's equations alone")
    g.add_argument("--negative-prompt", default=None,
                   help="default: the preset's (the authors' negative prompt, or none)")
    g.add_argument("--sam-checkpoint", default=None)
    g.add_argument("--sam-model-type", default="vit_h")
    g.add_argument("--region-guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="region-adaptive CFG (default: the preset's; on under authors)")
    g.add_argument("--ca-scale", type=float, default=None,
                   help="weight of non-concept tokens in the semantic map (default: the "
                        "preset's; authors: 0.9 for one concept, 0.6 for several)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magicface", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="customize an image from reference concepts")
    g.add_argument("--prompt", required=True)
    g.add_argument("--concept", action="append", default=[], metavar="SPEC",
                   help="word=IMAGE[,mask=MASK][,weight=W][,ref=TEXT][,box=x0:y0:x1:y1]; "
                        "repeat per concept")
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--save-maps", type=Path, default=None,
                   help="write the final semantic map as a coloured overlay")
    _model_options(g)
    _sampling_options(g, 0)

    r = sub.add_parser("run", help="run example.json files with one model load; writes "
                                   "the images and results.jsonl (what `eval` reads)")
    r.add_argument("inputs", nargs="+", type=Path, metavar="EXAMPLE",
                   help="an example.json, a folder holding one, or a folder of such folders")
    r.add_argument("--out", required=True, type=Path, help="results folder")
    _model_options(r)
    _sampling_options(r, None)
    r.set_defaults(save_maps=None)

    e = sub.add_parser("eval", help="CLIP-T, CLIP-I, DINO and face similarity of results")
    e.add_argument("results", type=Path,
                   help="a results folder (results.jsonl or manifest.jsonl) or a manifest")
    e.add_argument("--metrics", default="clip_t,clip_i,dino,face",
                   help="comma-separated subset of clip_t, clip_i, dino, face")
    e.add_argument("--clip-model", default=None, help="hub id or local folder")
    e.add_argument("--dino-model", default=None, help="hub id or local folder")
    e.add_argument("--face-model", default=None,
                   help="facenet-pytorch weights name (vggface2, casia-webface) or a "
                        "state-dict file")
    e.add_argument("--device", default=None)
    e.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    return p


def _load_pipe(args: argparse.Namespace):
    import torch

    from .pipeline import load_pipeline

    if args.tiny:
        print("magicface: --tiny uses random weights: the whole method runs, but the "
              "image is noise, not a picture.", file=sys.stderr)
    pipe = load_pipeline("tiny" if args.tiny else args.model, device=args.device,
                         dtype=getattr(torch, args.dtype) if args.dtype else None)
    pipe.fold_attention_bias = args.fold_bias
    if args.compile:
        pipe.enable_compile()
    return pipe


def _config(args: argparse.Namespace, seed: int, save_maps: bool):
    from . import GenerationConfig

    size = 128 if args.tiny else 512
    return GenerationConfig(
        steps=args.steps, guidance_scale=args.guidance_scale, alpha=args.alpha,
        seed=seed, height=args.height or size, width=args.width or size,
        negative_prompt=args.negative_prompt, preset=args.preset,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type, region_guidance=args.region_guidance,
        ca_scale=args.ca_scale, return_semantic_maps=save_maps,
    )


def _sample(pipe, prompt, concepts, config):
    from tqdm import tqdm

    with tqdm(total=config.steps, desc="sampling", unit="step", file=sys.stderr) as bar:
        return pipe.generate(prompt, concepts, config, on_step=lambda step, total: bar.update(1))


def _generate(args: argparse.Namespace) -> int:
    from . import Concept

    concepts = [Concept(**parse_concept(s)) for s in args.concept]
    config = _config(args, args.seed, args.save_maps is not None)
    pipe = _load_pipe(args)
    res = _sample(pipe, args.prompt, concepts, config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res.image.save(args.out)
    print(f"wrote {args.out}")
    if args.save_maps is not None:
        if res.semantic_maps:
            args.save_maps.parent.mkdir(parents=True, exist_ok=True)
            overlay_semantic_map(res.image, res.semantic_maps[-1]).save(args.save_maps)
            print(f"wrote {args.save_maps}")
        else:
            print("no semantic maps: there are no concepts", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .runs import load_examples, run_examples

    examples = load_examples(args.inputs)  # every input is checked before the model loads
    pipe = _load_pipe(args)
    path = run_examples(
        lambda ex, config: _sample(pipe, ex.prompt, ex.concepts, config), examples,
        lambda ex: _config(args, args.seed if args.seed is not None else ex.seed, False),
        args.out, log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {len(examples)} images and {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from .evaluation import (
        DEFAULT_CLIP,
        DEFAULT_DINO,
        DEFAULT_FACENET,
        Evaluator,
        load_manifest,
        report_json,
    )

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    items = load_manifest(args.results)
    ev = Evaluator(metrics, clip=args.clip_model or DEFAULT_CLIP,
                   dino=args.dino_model or DEFAULT_DINO,
                   facenet=args.face_model or DEFAULT_FACENET, device=args.device or "cpu")
    with tqdm(total=len(items), desc="evaluating", unit="image", file=sys.stderr) as bar:
        report = ev.evaluate(items, progress=lambda item: bar.update(1))
    print(report.table())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report_json(report, ev), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "run":
            return _run(args)
        if args.command == "eval":
            return _eval(args)
    except (ValueError, ImportError) as e:
        print(f"magicface: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a checkpoint that cannot be found or read
        print(f"magicface: error: could not load the model: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
