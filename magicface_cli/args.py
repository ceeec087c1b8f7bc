"""The `magicface` parser: every subcommand's options, their help and their defaults.

Limits come from `magicface_core.limits` and defaults from `magicface_core.rules` and
`GenerationConfig`, never from literals here, so `--help` states what the library and
the gateway enforce. Torch-free: `--help` and a bad option answer at once.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import fields
from pathlib import Path

from magicface_core.config import GenerationConfig
from magicface_core.limits import IMAGE_LIMITS, LIMITS
from magicface_core.rules import DEFAULT_PRESET, DEFAULT_WEIGHT, PRESETS

from .masks import add_mask_options

__all__ = ["build_parser", "config_from", "DEFAULT_MODEL", "DEFAULT_SIZE", "TINY_SIZE",
           "DESCRIPTION"]

DESCRIPTION = ("`magicface generate | run | mask | eval | serve | secret`: the method, "
               "batches of examples, masks from a word, their metrics, the local service "
               "and webhook secrets from the command line.")
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The library's defaults, the ones the gateway's parameters default to as well.
_DEFAULTS = {f.name: f.default for f in fields(GenerationConfig)}
DEFAULT_SIZE = _DEFAULTS["width"]
# The one exception to DEFAULT_SIZE, deliberate: --tiny's random weights draw noise at
# any size, and at 512 px the quick start's 50 steps cost five times the CPU (293 s
# against 56 s on 2 cores), which a first run must not wait for.
TINY_SIZE = 128


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """Epilogs keep their line breaks, and every option shows its default. An option
    whose default is decided elsewhere (None: the preset, the device) says so in its
    own help instead of a bare "(default: None)"."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Wrap at spaces only: a hub id or a path split at its hyphens reads as two.
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


def _size_default() -> str:
    return f"{DEFAULT_SIZE}; {TINY_SIZE} with --tiny"


def _model_options(g: argparse.ArgumentParser) -> None:
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_FOLDER",
                     help="diffusers SD1.x/2.x checkpoint: a hub id (downloaded once into "
                          "the Hugging Face cache, then loaded from there) or a local folder")
    src.add_argument("--tiny", action="store_true",
                     help="the random-weight tiny model: no download, the whole method "
                          f"runs, the image is noise ({TINY_SIZE} px unless --width/--height)")
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


def _number_options(g: argparse.ArgumentParser, run: bool) -> None:
    lim = LIMITS
    if run:
        g.add_argument("--seed", type=int, default=None,
                       help="seed of z_T and of the reference noise, for every example "
                            "(default: each example's own seed)")
    else:
        g.add_argument("--seed", type=int, default=_DEFAULTS["seed"],
                       help="seed of z_T and of the reference noise")
    g.add_argument("--steps", type=int, default=_DEFAULTS["steps"],
                   help=f"DDIM steps, {lim['steps'].describe()}")
    g.add_argument("--guidance-scale", type=float, default=_DEFAULTS["guidance_scale"],
                   help=f"classifier-free guidance, {lim['guidance_scale'].describe()}")
    g.add_argument("--alpha", type=float, default=_DEFAULTS["alpha"],
                   help="share of the steps that use RSA before RBA takes over, "
                        f"{lim['alpha'].describe()}")
    for name in ("height", "width"):
        g.add_argument(f"--{name}", type=int, default=None,
                       help=f"image {name}, a multiple of {lim[name].multiple_of} in "
                            f"{lim[name].describe()} (default: {_size_default()})")


def _method_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                   help="authors: what the authors' code computes (the published images); "
                        "paper: the paper's equations alone")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="what the image should not show (default: the preset's: the "
                        "authors' negative prompt, or none under paper)")
    g.add_argument("--sam-checkpoint", default=None,
                   help="segment-anything checkpoint, for concepts without a mask "
                        "(default: none: every concept needs a mask)")
    g.add_argument("--sam-model-type", default=_DEFAULTS["sam_model_type"],
                   help="segment-anything model type of --sam-checkpoint")
    g.add_argument("--region-guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="region-adaptive CFG (default: the preset's; on under authors)")
    g.add_argument("--ca-scale", type=float, default=None,
                   help="weight of non-concept tokens in the semantic map, "
                        f"{LIMITS['ca_scale'].describe()} (default: the preset's; authors: "
                        "0.9 for one concept, 0.6 for several; paper: 1)")


def _sampling_options(g: argparse.ArgumentParser, run: bool) -> None:
    _number_options(g, run)
    _method_options(g)


def limits_help() -> str:
    """The limits and defaults that generate's --help states, from the tables the
    library and the gateway read (the API reports the same at GET /v1/limits)."""
    w, pixels, most_bytes = LIMITS["width"], IMAGE_LIMITS["pixels"], IMAGE_LIMITS["bytes"]
    return f"""limits and defaults (magicface_core.limits and .rules; the API's are the same):
  concepts          at most {int(LIMITS['concepts'].high)} per image (none: plain Stable Diffusion)
  --width/--height  {w.describe()}, a multiple of {w.multiple_of}; default {DEFAULT_SIZE}
                    (the library's and the API's; {TINY_SIZE} with --tiny, a deliberate
                    exception: the random-weight model draws noise at any size)
  IMAGE, mask=      at most {pixels} pixels each; an upload to the API also at most
                    {most_bytes} bytes ({most_bytes / 2**20:g} MiB)
  weight=           {LIMITS['weight'].describe()}; default {DEFAULT_WEIGHT:g}
  --preset          {' or '.join(PRESETS)}; default {DEFAULT_PRESET}"""


CONCEPT_HELP = """--concept SPEC:
  word=IMAGE[,mask=MASK][,weight=W][,reference_prompt=TEXT][,box=x0:y0:x1:y1]
  word              a word (or phrase) of --prompt that the concept customizes
  IMAGE, mask=      the reference image and its mask (same size; white = the concept;
                    at most {pixels} pixels, as the API allows)
  weight=           RSA/RBA weight, in {weight} (default: {default_weight:g})
  reference_prompt= the reference image's own prompt (default: the word); ref= is short
                    for it; a comma in it is kept, quote it to keep a key=value
  box=              narrows the automatic mask (with --sam-checkpoint, no mask=)
  mask=auto         the mask proposed from the word (see `magicface mask`)"""
GENERATE_EPILOG = """example:
  magicface generate --prompt "a man with a hat" \\
    --concept "man=man.jpg,mask=man_mask.png,weight=2.5,reference_prompt=a man" \\
    --concept "hat=hat.jpg,mask=hat_mask.png,weight=2" \\
    --seed 1 --out out.png --save-maps maps.png

""" + CONCEPT_HELP.format(weight=LIMITS["weight"].describe(),
                      default_weight=DEFAULT_WEIGHT, pixels=IMAGE_LIMITS["pixels"]) + """

""" + limits_help() + """

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
MASK_EPILOG = """example:
  magicface mask man.jpg --word man -o man_mask.png
  magicface mask hat.jpg --word hat -o hat_mask.png \\
    --mask-detector IDEA-Research/grounding-dino-tiny

Prints {"out", "box", "score", "source"}. In generate, --concept "hat=hat.jpg,mask=auto"
does the same on the way. Nothing found is an error (exit status 2) naming the word."""
EVAL_EPILOG = """example:
  magicface eval results/ --metrics clip_t,dino --out results/eval.json
  magicface eval masks --examples examples/ --mask-detector IDEA-Research/grounding-dino-tiny \\
    --sam-checkpoint sam_vit_b_01ec64.pth"""


def _add_generate(sub: argparse._SubParsersAction) -> None:
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
    add_mask_options(g.add_argument_group("masks from the word (mask=auto)"))


def _add_mask(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mask", help="propose the mask of a concept in its reference image, "
                                    "from the word (to look at before generating)",
                       description="Propose the mask of a concept from its word.",
                       formatter_class=_HelpFormatter, epilog=MASK_EPILOG)
    m.add_argument("image", type=Path, metavar="IMAGE", help="the reference image")
    m.add_argument("--word", required=True, help="the concept's word (hat, man, ...)")
    m.add_argument("--reference-prompt", default=None, metavar="TEXT",
                   help="the reference image's own prompt, for the detector")
    m.add_argument("-o", "--out", required=True, type=Path, metavar="PATH",
                   help="the mask to write (.png; white = the concept)")
    m.add_argument("--device", default=None, help="cuda, cpu ... (default: cpu)")
    m.add_argument("--sam-checkpoint", default=None,
                   help="segment-anything checkpoint that outlines the found box "
                        "(default: none: an ellipse of it)")
    m.add_argument("--sam-model-type", default="vit_b",
                   help="segment-anything model type of --sam-checkpoint")
    add_mask_options(m)


def _add_run(sub: argparse._SubParsersAction) -> None:
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="CLIP-T, CLIP-I, DINO and face similarity of results",
                       description="The paper's metrics over a results folder.",
                       formatter_class=_HelpFormatter, epilog=EVAL_EPILOG)
    e.add_argument("results", type=Path,
                   help="a results folder (results.jsonl or manifest.jsonl) or a manifest; "
                        "`masks` (with --examples): the proposed masks against the hand ones")
    e.add_argument("--examples", nargs="+", type=Path, default=None, metavar="EXAMPLE",
                   help="eval masks: examples (as `run` takes them) with hand masks "
                        "(default: none: needed with `masks`)")
    e.add_argument("--sam-checkpoint", default=None,
                   help="eval masks: segment-anything checkpoint for the proposals "
                        "(default: none: ellipses of the found boxes)")
    e.add_argument("--sam-model-type", default="vit_b",
                   help="eval masks: segment-anything model type of --sam-checkpoint")
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
    add_mask_options(e.add_argument_group("eval masks: the proposer"))


def build_parser() -> argparse.ArgumentParser:
    from magicface_core import __version__

    p = argparse.ArgumentParser(prog="magicface", description=DESCRIPTION,
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"magicface {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_run(sub)
    _add_mask(sub)
    sub.add_parser("secret", help="print a fresh webhook secret (whsec_ + 32 random bytes "
                                  "in base64) for WEBHOOK_SECRET",
                   description="Print a fresh Standard Webhooks secret for WEBHOOK_SECRET.")
    # Parsed by service.stack itself (main hands `serve ...` over before this parser).
    sub.add_parser("serve", add_help=False,
                   help="run the service on this machine: Redis (when none answers), the "
                        "gateway and workers, until Ctrl-C (`magicface serve --help`; needs "
                        "the magicface-server distribution)")
    _add_eval(sub)
    return p


def config_from(args: argparse.Namespace, seed: int, save_maps: bool) -> GenerationConfig:
    """The library's config of generate's or run's options (`seed` and whether to keep
    the semantic maps are the caller's: run's differ per example)."""
    size = TINY_SIZE if args.tiny else DEFAULT_SIZE
    return GenerationConfig(
        steps=args.steps, guidance_scale=args.guidance_scale, alpha=args.alpha,
        seed=seed, height=args.height or size, width=args.width or size,
        negative_prompt=args.negative_prompt, preset=args.preset,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type, region_guidance=args.region_guidance,
        ca_scale=args.ca_scale, return_semantic_maps=save_maps,
    )
