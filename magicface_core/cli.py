"""`magicface generate | run | eval`: the method, batches of examples and their metrics
from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_checks import check_concepts, check_numbers, check_output_path
from .errors import MagicFaceInputError
from .limits import LIMITS
from .overlay import concept_color, overlay_semantic_map

__all__ = ["main", "parse_concept", "overlay_semantic_map"]

_CONCEPT_KEYS = ("mask", "weight", "reference_prompt", "ref", "box")
_TEXT_KEYS = ("reference_prompt", "ref")  # free text: may hold commas


def parse_concept(spec: str) -> dict:
    """`word=IMAGE[,mask=MASK][,weight=W][,reference_prompt=TEXT][,box=x0:y0:x1:y1]`
    -> fields (`ref=` is short for `reference_prompt=`).

    A comma inside the reference prompt is kept: a piece after it that is not
    `key=value` belongs to it. Any other unknown key is an error (a typo like `masks=`
    must not become part of a file name).
    """
    pieces: list[str] = []
    for part in spec.split(","):
        key = part.split("=", 1)[0].strip()
        in_text = bool(pieces) and pieces[-1].split("=", 1)[0].strip() in _TEXT_KEYS
        if pieces and in_text and ("=" not in part or key not in _CONCEPT_KEYS):
            pieces[-1] += "," + part
            continue
        if pieces and ("=" not in part or key not in _CONCEPT_KEYS):
            raise ValueError(f"--concept {spec!r}: unknown key {key!r} (keys: "
                             "mask, weight, reference_prompt (or ref), box)")
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
        elif key in _TEXT_KEYS:
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
    src.add_argument("--model", default=DEFAULT_MODEL,
                     help="diffusers SD1.x/2.x checkpoint: a hub id (downloaded once into "
                          "the Hugging Face cache) or a local folder")
    src.add_argument("--tiny", action="store_true",
                     help="the random-weight tiny model: no download, the whole method "
                          "runs, the image is noise")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda "
                                                  "when available, else cpu)")
    g.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="model dtype (default: float16 on cuda, float32 on cpu)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (slow first image; falls back to eager)")
    g.add_argument("--fold-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="carry the RSA/RBA bias in extra head dims (mask-free SDPA); "
                        "--no-fold-bias passes it as a dense SDPA mask")
    g.add_argument("--quiet", action="store_true",
                   help="no progress output (errors are still printed)")


def _sampling_options(g: argparse.ArgumentParser, seed_default: int | None) -> None:
    lim = LIMITS
    g.add_argument("--seed", type=int, default=seed_default,
                   help="seed of z_T and of the reference noise" + (
                       "" if seed_default is not None else " (default: each example's)"))
    g.add_argument("--steps", type=int, default=50,
                   help=f"DDIM steps, {lim['steps'].describe()}")
    g.add_argument("--guidance-scale", type=float, default=7.5,
                   help=f"classifier-free guidance, {lim['guidance_scale'].describe()}")
    g.add_argument("--alpha", type=float, default=0.4,
                   help="share of the steps that use RSA before RBA takes over, "
                        f"{lim['alpha'].describe()}")
    g.add_argument("--height", type=int, default=None,
                   help="image height, a multiple of 8 in "
                        f"{lim['height'].describe()} (default: 512; 128 with --tiny)")
    g.add_argument("--width", type=int, default=None,
                   help="image width, like --height (default: 512; 128 with --tiny)")
    g.add_argument("--preset", choices=("authors", "paper"), default="authors",
                   help="authors: what the authors' code computes (the published images); "
                        "paper: the paper's equations alone")
    g.add_argument("--negative-prompt", default=None,
                   help="default: the preset's (the authors' negative prompt, or none)")
    g.add_argument("--sam-checkpoint", default=None,
                   help="segment-anything checkpoint, for concepts without a mask")
    g.add_argument("--sam-model-type", default="vit_h",
                   help="segment-anything model type of --sam-checkpoint")
    g.add_argument("--region-guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="region-adaptive CFG (default: the preset's; on under authors)")
    g.add_argument("--ca-scale", type=float, default=None,
                   help="weight of non-concept tokens in the semantic map, "
                        f"{lim['ca_scale'].describe()} (default: the preset's; authors: "
                        "0.9 for one concept, 0.6 for several)")


GENERATE_EXAMPLE = """example:
  magicface generate --prompt "a man with a hat" \\
    --concept "man=man.jpg,mask=man_mask.png,weight=2.5,reference_prompt=a man" \\
    --concept "hat=hat.jpg,mask=hat_mask.png,weight=2" \\
    --seed 1 --out out.png --save-maps maps.png

--concept SPEC: word=IMAGE[,mask=MASK][,weight=W][,reference_prompt=TEXT][,box=x0:y0:x1:y1]
  (ref= is short for reference_prompt=; weight in (0, 20], default 3)"""
RUN_EXAMPLE = """example:
  magicface run examples/ --out results/ --tiny --steps 4
  magicface run examples/trio/example.json more.jsonl --out results/

Inputs: example.json files, folders holding one, folders of such folders, and .jsonl
manifests (one example object per line, paths relative to the manifest)."""
EVAL_EXAMPLE = """example:
  magicface eval results/ --metrics clip_t,dino --out results/eval.json"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter

    class Formatter(argparse.RawDescriptionHelpFormatter, fmt):
        pass

    p = argparse.ArgumentParser(prog="magicface", description=__doc__, formatter_class=Formatter)
    p.add_argument("--version", action="version", version=f"magicface {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="customize an image from reference concepts",
                       formatter_class=Formatter, epilog=GENERATE_EXAMPLE)
    g.add_argument("--prompt", required=True, help="the target prompt; each concept's word "
                                                   "must occur in it")
    g.add_argument("--concept", action="append", default=[], metavar="SPEC",
                   help="a reference concept (see below); repeat per concept")
    g.add_argument("--out", required=True, type=Path, help="the image (.png, .jpg, .webp)")
    g.add_argument("--save-maps", type=Path, default=None,
                   help="write the final semantic map over the image with a legend, and "
                        "the raw label map as <stem>_labels.png")
    g.add_argument("--save-maps-every", type=int, default=None, metavar="K",
                   help="with --save-maps, also the overlay every K steps "
                        "(<stem>_step<NNN>.png)")
    _model_options(g)
    _sampling_options(g, 0)

    r = sub.add_parser("run", help="run many examples with one model load; writes the "
                                   "images, results.jsonl (what `eval` reads) and "
                                   "summary.json", formatter_class=Formatter,
                       epilog=RUN_EXAMPLE)
    r.add_argument("inputs", nargs="+", type=Path, metavar="EXAMPLE",
                   help="example.json, a folder holding one, a folder of such folders, or "
                        "a .jsonl manifest")
    r.add_argument("--out", required=True, type=Path, help="results folder")
    _model_options(r)
    _sampling_options(r, None)
    r.set_defaults(save_maps=None, save_maps_every=None)

    e = sub.add_parser("eval", help="CLIP-T, CLIP-I, DINO and face similarity of results",
                       formatter_class=Formatter, epilog=EVAL_EXAMPLE)
    e.add_argument("results", type=Path,
                   help="a results folder (results.jsonl or manifest.jsonl) or a manifest")
    e.add_argument("--metrics", default="clip_t,clip_i,dino,face",
                   help="comma-separated subset of clip_t, clip_i, dino, face")
    e.add_argument("--clip-model", default=None,
                   help="hub id or local folder (default: openai/clip-vit-large-patch14)")
    e.add_argument("--dino-model", default=None,
                   help="hub id or local folder (default: facebook/dino-vits16)")
    e.add_argument("--face-model", default=None,
                   help="facenet-pytorch weights name (vggface2, casia-webface) or a "
                        "state-dict file (default: vggface2)")
    e.add_argument("--device", default=None, help="cuda, cpu ... (default: cpu)")
    e.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    return p


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _is_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def check_model(args: argparse.Namespace) -> None:
    """Before loading: a local folder exists; a hub id is in the local cache when the
    hub is off (HF_HUB_OFFLINE), so the user hears at once what to do instead."""
    if args.tiny:
        return
    model = args.model
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise MagicFaceInputError(f"--model: no such folder: {model}")
    if _is_local(model):
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return  # cached: loads without the network
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise MagicFaceInputError(OFFLINE_HINT.format(model=model))
    import socket

    try:  # seconds, not the half minute of retries a download attempt takes to fail
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise MagicFaceInputError(OFFLINE_HINT.format(model=model)) from None


DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
OFFLINE_HINT = ("--model: {model} is not in the local Hugging Face cache and the hub is "
                "off or unreachable: use --tiny (random weights, no download) or "
                "--model /path/to/a/local/diffusers/folder")


def _load_pipe(args: argparse.Namespace):
    import time

    import torch

    from .pipeline import load_pipeline

    if args.tiny:
        _say(args, "magicface: --tiny uses random weights: the whole method runs, but the "
                   "image is noise, not a picture.")
    name = "tiny" if args.tiny else args.model
    _say(args, f"loading {name} ...")
    started = time.perf_counter()
    try:
        pipe = load_pipeline(name, device=args.device,
                             dtype=getattr(torch, args.dtype) if args.dtype else None)
    except OSError as e:
        if _is_local(name):
            raise MagicFaceInputError(f"--model: could not load {name}: {e}") from None
        raise MagicFaceInputError(OFFLINE_HINT.format(model=name) + f" ({e})") from None
    _say(args, f"loaded {name} on {pipe.device} in {time.perf_counter() - started:.1f} s")
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


def _sample(pipe, prompt, concepts, config, quiet: bool = False):
    from tqdm import tqdm

    if concepts and not quiet:
        print(f"preparing {len(concepts)} reference(s) and sampling", file=sys.stderr)
    with tqdm(total=config.steps, desc="sampling", unit="step", file=sys.stderr,
              disable=quiet) as bar:
        return pipe.generate(prompt, concepts, config, on_step=lambda step, total: bar.update(1))


def _check_sampling(args: argparse.Namespace) -> None:
    check_numbers(steps=args.steps, guidance_scale=args.guidance_scale, alpha=args.alpha,
                  height=args.height, width=args.width, ca_scale=args.ca_scale)
    if args.seed is not None and (problem := LIMITS["seed"].check("seed", args.seed)):
        raise MagicFaceInputError(f"--seed: {problem}")


def _generate(args: argparse.Namespace) -> int:
    from . import Concept

    # 1. Everything that can be checked without a model.
    specs = [parse_concept(s) for s in args.concept]
    check_concepts(args.prompt, specs)
    _check_sampling(args)
    check_output_path(args.out, "--out")
    if args.save_maps is not None:
        check_output_path(args.save_maps, "--save-maps", suffixes=(".png",))
    if args.save_maps_every is not None and args.save_maps_every < 1:
        raise MagicFaceInputError("--save-maps-every: must be at least 1")
    concepts = [Concept(**spec) for spec in specs]
    config = _config(args, args.seed, args.save_maps is not None)
    check_model(args)
    # 2. The model, then the image.
    pipe = _load_pipe(args)
    res = _sample(pipe, args.prompt, concepts, config, args.quiet)
    res.image.save(args.out)
    print(f"wrote {args.out}")
    if args.save_maps is not None:
        if res.semantic_maps:
            for path in save_maps(res, [c.word for c in concepts], args.save_maps,
                                  args.save_maps_every):
                print(f"wrote {path}")
        else:
            print("no semantic maps: there are no concepts", file=sys.stderr)
    return 0


def save_maps(res, words: list[str], path: Path, every: int | None = None) -> list[Path]:
    """The final map over the image with a legend strip, the raw label map (indices:
    0 background, i + 1 concept i) as `<stem>_labels.png`, and with `every` the overlay
    each `every` steps."""
    from PIL import Image

    written = []
    with_legend(overlay_semantic_map(res.image, res.semantic_maps[-1]), words).save(path)
    written.append(path)
    labels = res.semantic_maps[-1].numpy().astype("uint8")
    labels_path = path.with_name(f"{path.stem}_labels.png")
    Image.fromarray(labels, mode="L").save(labels_path)
    written.append(labels_path)
    if every:
        for i in range(every - 1, len(res.semantic_maps), every):
            step_path = path.with_name(f"{path.stem}_step{i + 1:03d}.png")
            with_legend(overlay_semantic_map(res.image, res.semantic_maps[i]),
                        words).save(step_path)
            written.append(step_path)
    return written


def with_legend(image, words: list[str]):
    """The image with a strip below: a swatch of each concept's colour and its word."""
    from PIL import Image, ImageDraw

    row = 16
    strip = Image.new("RGB", (image.width, row * max(1, len(words)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, word in enumerate(words):
        y = 2 + i * row
        draw.rectangle([4, y + 2, 16, y + 13], fill=concept_color(i))
        draw.text((22, y + 2), word, fill=(0, 0, 0))
    out = Image.new("RGB", (image.width, image.height + strip.height), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(strip, (0, image.height))
    return out


def _run(args: argparse.Namespace) -> int:
    from .runs import load_examples, run_examples

    # Every input is read and checked before the model loads.
    examples = load_examples(args.inputs)
    for ex in examples:
        try:
            check_concepts(ex.prompt, [_spec(c) for c in ex.concepts])
        except MagicFaceInputError as e:
            raise MagicFaceInputError(f"{ex.path}: {e}") from None
    _check_sampling(args)
    check_output_path(args.out, "--out", suffixes=())
    configs = {ex.name: _config(args, args.seed if args.seed is not None else ex.seed, False)
               for ex in examples}
    check_model(args)
    pipe = _load_pipe(args)
    path = run_examples(
        lambda ex, config: _sample(pipe, ex.prompt, ex.concepts, config, args.quiet),
        examples, lambda ex: configs[ex.name], args.out,
        log=lambda line: _say(args, line),
        model="tiny" if args.tiny else args.model)
    print(f"wrote {len(examples)} images, {path} and {path.with_name('summary.json')}")
    return 0


def _spec(c) -> dict:
    spec = {"word": c.word, "image": str(c.image), "weight": c.weight}
    if c.mask is not None:
        spec["mask"] = str(c.mask)
    return spec


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
    except (ValueError, ImportError) as e:  # MagicFaceInputError is a ValueError
        print(f"magicface: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
