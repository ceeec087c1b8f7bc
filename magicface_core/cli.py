"""`magicface generate | run | eval | serve | secret`: the method, batches of examples,
their metrics, the local service and webhook secrets from the command line."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cli_checks import (
    ModelSource,
    check_concepts,
    check_image_output,
    check_limit,
    check_prompt,
    check_sam_checkpoint,
    check_text,
    check_writable_folder,
    locate_model,
    parse_concept,
)
from .errors import MagicFaceInputError
from .limits import IMAGE_LIMITS, LIMITS
from .overlay import concept_color, overlay_semantic_map
from .rules import DEFAULT_PRESET, DEFAULT_WEIGHT, PRESETS

__all__ = ["main", "build_parser", "parse_concept", "overlay_semantic_map", "save_maps",
           "with_legend"]

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# --tiny's random-weight model is small; 512 would only make the tests slow.
DEFAULT_SIZE, TINY_SIZE = 512, 128


# -- the parser -------------------------------------------------------------------------

class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """Epilogs keep their line breaks, and every option shows its default. An option
    whose default is decided elsewhere (None: the preset, the device) says so in its
    own help instead of a bare "(default: None)"."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Wrap at spaces only: a hub id or a path split at its hyphens reads as two.
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("(default:" in text or "%(default)" in text or action.required
                or not action.option_strings or action.default in (None, [])
                or action.default is argparse.SUPPRESS):
            return text
        if action.default is False and action.nargs == 0:
            return text + " (default: off)"
        return text + " (default: %(default)s)"


def _model_options(g: argparse.ArgumentParser) -> None:
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_FOLDER",
                     help="diffusers SD1.x/2.x checkpoint: a hub id (downloaded once into "
                          "the Hugging Face cache, then loaded from there) or a local folder")
    src.add_argument("--tiny", action="store_true",
                     help="the random-weight tiny model: no download, the whole method "
                          "runs, the image is noise")
    g.add_argument("--device", default=None,
                   help="cuda, cpu, cuda:1 ... (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="model dtype (default: float16 on cuda, float32 on cpu)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (slow first image; falls back to eager)")
    g.add_argument("--fold-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="carry the RSA/RBA bias in extra head dims (mask-free SDPA); "
                        "--no-fold-bias passes it as a dense SDPA mask")
    g.add_argument("--quiet", action="store_true",
                   help="no progress messages or bars (errors are still printed)")


def _sampling_options(g: argparse.ArgumentParser, run: bool) -> None:
    lim = LIMITS
    if run:
        g.add_argument("--seed", type=int, default=None,
                       help="seed of z_T and of the reference noise, for every example "
                            "(default: each example's own seed)")
    else:
        g.add_argument("--seed", type=int, default=0,
                       help="seed of z_T and of the reference noise")
    g.add_argument("--steps", type=int, default=50, help=f"DDIM steps, {lim['steps'].describe()}")
    g.add_argument("--guidance-scale", type=float, default=7.5,
                   help=f"classifier-free guidance, {lim['guidance_scale'].describe()}")
    g.add_argument("--alpha", type=float, default=0.4,
                   help="share of the steps that use RSA before RBA takes over, "
                        f"{lim['alpha'].describe()}")
    g.add_argument("--height", type=int, default=None,
                   help=f"image height, a multiple of 8 in {lim['height'].describe()} "
                        f"(default: {DEFAULT_SIZE}; {TINY_SIZE} with --tiny)")
    g.add_argument("--width", type=int, default=None,
                   help=f"image width, a multiple of 8 in {lim['width'].describe()} "
                        f"(default: {DEFAULT_SIZE}; {TINY_SIZE} with --tiny)")
    g.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                   help="authors: what the authors' code computes (the published images); "
                        "paper: the paper's equations alone")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="what the image should not show (default: the preset's: the "
                        "authors' negative prompt, or none under paper)")
    g.add_argument("--sam-checkpoint", default=None,
                   help="segment-anything checkpoint, for concepts without a mask "
                        "(default: none: every concept needs a mask)")
    g.add_argument("--sam-model-type", default="vit_h",
                   help="segment-anything model type of --sam-checkpoint")
    g.add_argument("--region-guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="region-adaptive CFG (default: the preset's; on under authors)")
    g.add_argument("--ca-scale", type=float, default=None,
                   help="weight of non-concept tokens in the semantic map, "
                        f"{lim['ca_scale'].describe()} (default: the preset's; authors: "
                        "0.9 for one concept, 0.6 for several; paper: 1)")


CONCEPT_HELP = """--concept SPEC:
  word=IMAGE[,mask=MASK][,weight=W][,reference_prompt=TEXT][,box=x0:y0:x1:y1]
  word              a word (or phrase) of --prompt that the concept customizes
  IMAGE, mask=      the reference image and its mask (same size; white = the concept;
                    at most {pixels} pixels, as the API allows)
  weight=           RSA/RBA weight, in {weight} (default: {default_weight:g})
  reference_prompt= the reference image's own prompt (default: the word); ref= is short
                    for it; a comma in it is kept, quote it to keep a key=value
  box=              narrows the automatic mask (with --sam-checkpoint, no mask=)"""
GENERATE_EPILOG = """example:
  magicface generate --prompt "a man with a hat" \\
    --concept "man=man.jpg,mask=man_mask.png,weight=2.5,reference_prompt=a man" \\
    --concept "hat=hat.jpg,mask=hat_mask.png,weight=2" \\
    --seed 1 --out out.png --save-maps maps.png

""" + CONCEPT_HELP.format(weight=LIMITS["weight"].describe(),
                      default_weight=DEFAULT_WEIGHT, pixels=IMAGE_LIMITS["pixels"]) + """

Every input is checked before the model loads; bad input exits with status 2."""
RUN_EPILOG = """example:
  magicface run examples/synthetic examples/trio/example.json more.jsonl \\
    --out results/ --tiny --steps 4 --width 64 --height 64

Inputs: example.json files, folders holding one, folders of such folders, and .jsonl
manifests (one example object per line, its paths relative to the manifest). An
example: {"prompt": "a man wearing a hat", "seed": 1, "name": "optional",
  "concepts": [{"word": "man", "image": "face.png", "mask": "face_mask.png",
                "weight": 3, "reference_prompt": "a man"}]}
Writes <name>.png per example, results.jsonl (what `magicface eval` reads) and
summary.json. Exit status: 0 all succeeded, 1 some failed, 2 bad input (nothing run)."""
EVAL_EPILOG = """example:
  magicface eval results/ --metrics clip_t,dino --out results/eval.json"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="magicface", description=__doc__,
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"magicface {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="customize an image from reference concepts",
                       description="Customize one image from reference concepts.",
                       formatter_class=_HelpFormatter, epilog=GENERATE_EPILOG)
    g.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the target prompt; each concept's word must occur in it")
    g.add_argument("--concept", action="append", default=[], metavar="SPEC",
                   help="a reference concept (see below); repeat per concept, at most "
                        f"{int(LIMITS['concepts'].high)} (default: none: plain Stable "
                        "Diffusion)")
    g.add_argument("--out", required=True, type=Path, metavar="PATH",
                   help="the image to write (.png, .jpg/.jpeg or .webp; its folder must exist)")
    g.add_argument("--save-maps", type=Path, default=None, metavar="PATH",
                   help="write the final semantic map over the image with a legend below "
                        "(.png, .jpg or .webp), and the raw label map as <stem>_labels.png "
                        "(0 background, i+1 concept i) (default: no maps)")
    g.add_argument("--save-maps-every", type=int, default=None, metavar="K",
                   help="with --save-maps, also the overlay every K steps as "
                        "<stem>_step<NNN>.png (default: the final map only)")
    _model_options(g)
    _sampling_options(g, run=False)

    r = sub.add_parser("run", help="run many examples with one model load; writes the "
                                   "images, results.jsonl (what `eval` reads) and "
                                   "summary.json",
                       description="Run many examples with one model load.",
                       formatter_class=_HelpFormatter, epilog=RUN_EPILOG)
    r.add_argument("inputs", nargs="+", type=Path, metavar="EXAMPLE",
                   help="example.json, a folder holding one, a folder of such folders, or "
                        "a .jsonl manifest")
    r.add_argument("--out", required=True, type=Path, metavar="FOLDER",
                   help="the results folder (made when missing)")
    r.add_argument("--save-maps", action="store_true",
                   help="also write <name>_maps.png (the final map with a legend) and "
                        "<name>_maps_labels.png per example")
    r.add_argument("--save-maps-every", type=int, default=None, metavar="K",
                   help="with --save-maps, also the overlay every K steps as "
                        "<name>_maps_step<NNN>.png (default: the final map only)")
    _model_options(r)
    _sampling_options(r, run=True)

    sub.add_parser("secret", help="print a fresh webhook secret (whsec_ + 32 random bytes "
                                  "in base64) for WEBHOOK_SECRET",
                   description="Print a fresh Standard Webhooks secret for WEBHOOK_SECRET.")
    sub.add_parser("serve", add_help=False,
                   help="run the service on this machine: Redis (when none answers), the "
                        "gateway and workers, until Ctrl-C (`magicface serve --help`; needs "
                        "the magicface-server distribution)")

    e = sub.add_parser("eval", help="CLIP-T, CLIP-I, DINO and face similarity of results",
                       description="The paper's metrics over a results folder.",
                       formatter_class=_HelpFormatter, epilog=EVAL_EPILOG)
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
    e.add_argument("--out", type=Path, default=None,
                   help="write the report as JSON (default: the table on stdout only)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# -- progress ---------------------------------------------------------------------------

class _Progress:
    """Messages and tqdm bars on stderr (stdout keeps the results), all off with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str, unit: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=self.quiet)


def _silence_library_bars() -> None:
    # diffusers, transformers and the hub client draw their own bars (downloads,
    # checkpoint shards); --quiet means none.
    import importlib

    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            importlib.import_module(name).disable_progress_bar()
        except ImportError:  # pragma: no cover - both come with the library
            pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


# -- checks shared by generate and run --------------------------------------------------

def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_options(args: argparse.Namespace) -> None:
    """The sampling numbers against the limits table, the texts, the SAM checkpoint and
    --save-maps-every: all without a model."""
    for name in ("steps", "guidance_scale", "alpha", "seed", "height", "width", "ca_scale"):
        value = getattr(args, name)
        if value is not None:
            check_limit(name, value, _option(name))
    if args.negative_prompt is not None:
        check_text("negative_prompt", args.negative_prompt, "--negative-prompt")
    check_sam_checkpoint(args.sam_checkpoint)
    if args.save_maps_every is not None:
        if args.save_maps_every < 1:
            raise MagicFaceInputError(f"--save-maps-every must be at least 1, got "
                                      f"{args.save_maps_every}")
        if not args.save_maps:
            raise MagicFaceInputError("--save-maps-every needs --save-maps")


def _config(args: argparse.Namespace, seed: int, save_maps: bool):
    from . import GenerationConfig

    size = TINY_SIZE if args.tiny else DEFAULT_SIZE
    return GenerationConfig(
        steps=args.steps, guidance_scale=args.guidance_scale, alpha=args.alpha,
        seed=seed, height=args.height or size, width=args.width or size,
        negative_prompt=args.negative_prompt, preset=args.preset,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type, region_guidance=args.region_guidance,
        ca_scale=args.ca_scale, return_semantic_maps=save_maps,
    )


# -- the model and a sample -------------------------------------------------------------

def _load_pipe(args: argparse.Namespace, source: ModelSource, progress: _Progress):
    """Load the pipeline located by `locate_model`: the only place the CLI loads one."""
    started = time.perf_counter()  # torch's import is part of what the user waits for
    import torch

    from . import pipeline

    if args.quiet:
        _silence_library_bars()
    if args.tiny:
        progress.say("magicface: --tiny uses random weights: the whole method runs, but the "
                     "image is noise, not a picture.")
    where = "" if source.path in (source.name, "tiny") else f" (from {source.path})"
    progress.say(f"loading {source.name}{where} ...")
    try:
        pipe = pipeline.load_pipeline(source.path, device=args.device,
                                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    except OSError as e:
        from .cli_checks import ModelUnavailable, offline_hint

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if source.download:  # the hub answered but the download failed
            raise ModelUnavailable(offline_hint(source.name, f"could not be loaded ({first})")) \
                from None
        raise MagicFaceInputError(f"--model {source.name}: could not load it ({first})") \
            from None
    # A cached snapshot loads by its folder; reports and the K/V cache keep the id.
    if source.path != "tiny":
        pipe.model_name = source.name
    progress.say(f"loaded {source.name} on {pipe.device} ({str(pipe.dtype).split('.')[-1]}) "
                 f"in {time.perf_counter() - started:.1f} s")
    pipe.fold_attention_bias = args.fold_bias
    if args.compile:
        pipe.enable_compile()
    return pipe


def _sample(pipe, prompt: str, concepts: Sequence[Any], config, progress: _Progress):
    """`pipe.generate` with a bar for preparing the references, then one for the steps.

    The library has no hook between preparing the references and the first step, so
    the instance's `prepare_references` is wrapped for this call (the class's method is
    untouched) to close the one bar and open the other at that point."""
    bars: dict[str, Any] = {}
    had_own = "prepare_references" in vars(pipe)
    inner = pipe.prepare_references

    def sampling_bar():
        if "sampling" not in bars:
            bars["sampling"] = progress.bar(config.steps, "sampling", "step")
        return bars["sampling"]

    def prepare(cs, cfg):
        if not cs:
            refs = inner(cs, cfg)
        else:
            with progress.bar(len(cs), "references", "ref") as bar:
                refs = inner(cs, cfg)
                bar.update(len(refs))
        sampling_bar()
        return refs

    pipe.prepare_references = prepare
    try:
        return pipe.generate(prompt, concepts, config,
                             on_step=lambda step, total: sampling_bar().update(1))
    finally:
        if had_own:
            pipe.prepare_references = inner
        else:
            del pipe.prepare_references
        if "sampling" in bars:
            bars["sampling"].close()


# -- maps -------------------------------------------------------------------------------

def with_legend(image, words: Sequence[str]):
    """The image with a white strip below: per concept, a swatch of its colour
    (`overlay.concept_color`) and its word in PIL's default font."""
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


def save_maps(res, words: Sequence[str], path: Path, every: int | None = None) -> list[Path]:
    """The final map over the image with a legend at `path`, the raw label map
    (indices at the map's own resolution: 0 background, i + 1 concept i) as
    `<stem>_labels.png`, and with `every` the overlay each `every` steps as
    `<stem>_step<NNN>.png` (1-based steps, over the final image)."""
    from PIL import Image

    written = [path]
    with_legend(overlay_semantic_map(res.image, res.semantic_maps[-1]), words).save(path)
    labels_path = path.with_name(f"{path.stem}_labels.png")
    # uint8 holds every label: at most LIMITS["concepts"].high concepts.
    Image.fromarray(res.semantic_maps[-1].numpy().astype("uint8")).save(labels_path)
    written.append(labels_path)
    if every:
        for i in range(every - 1, len(res.semantic_maps), every):
            step_path = path.with_name(f"{path.stem}_step{i + 1:03d}.png")
            with_legend(overlay_semantic_map(res.image, res.semantic_maps[i]),
                        words).save(step_path)
            written.append(step_path)
    return written


# -- the commands -----------------------------------------------------------------------

def _concept_label(specs: Sequence[dict]) -> Callable[[int, str], str]:
    def label(i: int, field: str) -> str:
        if not 0 <= i < len(specs):  # the concepts as a whole
            return "--concept"
        head = f"--concept {specs[i].get('word')}"
        return head if field in ("", "word") else f"{head} {field}"

    return label


def _generate(args: argparse.Namespace) -> int:
    from . import Concept

    # 1. Everything that can be checked without a model, in the order a user reads it.
    check_prompt(args.prompt)
    specs = [parse_concept(s) for s in args.concept]
    _check_options(args)
    check_concepts(args.prompt, specs, _concept_label(specs), args.sam_checkpoint)
    check_image_output(args.out, "--out")
    if args.save_maps is not None:
        check_image_output(args.save_maps, "--save-maps")
        if args.save_maps.expanduser().absolute() == args.out.expanduser().absolute():
            raise MagicFaceInputError("--save-maps: the same file as --out")
    concepts = [Concept(**spec) for spec in specs]
    config = _config(args, args.seed, args.save_maps is not None)
    source = locate_model(args.model, args.tiny)
    # 2. The model, then the image.
    progress = _Progress(args.quiet)
    pipe = _load_pipe(args, source, progress)
    res = _sample(pipe, args.prompt, concepts, config, progress)
    res.image.save(args.out)
    print(f"wrote {args.out}")
    if args.save_maps is not None:
        if res.semantic_maps:
            for path in save_maps(res, [c.word for c in concepts], args.save_maps,
                                  args.save_maps_every):
                print(f"wrote {path}")
        else:
            # A warning, not progress: what was asked for was not written.
            print("magicface: no semantic maps to save: there are no concepts", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .runs import SUMMARY_FILE, load_examples, run_examples

    # 1. Every option and every example, before the model.
    _check_options(args)
    check_writable_folder(args.out, "--out")
    examples = load_examples(args.inputs, sam_checkpoint=args.sam_checkpoint)
    configs = {}
    for ex in examples:
        try:
            configs[ex.name] = _config(args, args.seed if args.seed is not None else ex.seed,
                                       args.save_maps)
        except MagicFaceInputError as e:
            raise MagicFaceInputError(f"{ex.where}: {e}") from None
    source = locate_model(args.model, args.tiny)
    # 2. One model for all of them.
    progress = _Progress(args.quiet)
    started = time.perf_counter()
    pipe = _load_pipe(args, source, progress)
    load_seconds = time.perf_counter() - started

    def maps_of(ex, res) -> dict:
        if not args.save_maps or not res.semantic_maps:
            return {}
        paths = save_maps(res, [c.word for c in ex.concepts], args.out / f"{ex.name}_maps.png",
                          args.save_maps_every)
        return {"maps": paths[0].name, "labels": paths[1].name}

    summary = run_examples(
        lambda ex, config: _sample(pipe, ex.prompt, ex.concepts, config, progress),
        examples, lambda ex: configs[ex.name], args.out, log=progress.say,
        model=source.name, preset=args.preset, load_seconds=load_seconds, on_result=maps_of)
    print(f"wrote {summary['succeeded']} of {summary['count']} images, results.jsonl and "
          f"{SUMMARY_FILE} in {args.out}")
    # 1, not 2: the inputs were fine; generating some of them failed (see the summary).
    return 0 if summary["failed"] == 0 else 1


def _eval(args: argparse.Namespace) -> int:
    import json

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
    with _Progress(args.quiet).bar(len(items), "evaluating", "image") as bar:
        report = ev.evaluate(items, progress=lambda item: bar.update(1))
    print(report.table())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report_json(report, ev), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _secret(args: argparse.Namespace) -> int:
    import base64
    import secrets

    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    return 0


def _serve(rest: list[str]) -> int:
    """`magicface serve ...` is `python -m service.stack ...`: the stack belongs to the
    server distribution, so the method package hands over to it instead of importing it."""
    if importlib.util.find_spec("service") is None:
        print("magicface: error: serve needs the server: pip install -c constraints.txt "
              "./server (the magicface-server distribution, from the repository)",
              file=sys.stderr)
        return 2
    os.execv(sys.executable, [sys.executable, "-m", "service.stack", *rest])
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 2 bad input or a model that cannot be had (nothing was
    generated: the user fixes the command); 1 `run` finished but some examples failed."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {"generate": _generate, "run": _run, "eval": _eval, "secret": _secret}
    try:
        return commands[args.command](args)
    except (ValueError, ImportError) as e:  # MagicFaceInputError is a ValueError
        message = " ".join(str(e).splitlines())
        print(f"magicface: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
