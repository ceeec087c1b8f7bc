"""Loading Stable Diffusion components, and the tiny random-weight SD1.5-shaped model."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

__all__ = ["Components", "COMPONENT_NAMES", "load_components", "tiny_components",
           "write_tiny_tokenizer", "TINY_WORDS", "save_components", "sharpen_attention"]

# Whole-word tokens in the tiny tokenizer; every other word falls back to one token
# per character, so the tests see both single- and multi-token concept words.
TINY_QUERY_GAIN = 4.0

TINY_WORDS = ("a", "man", "woman", "girl", "hat", "with", "wearing", "vase", "photo", "of")


@dataclass(eq=False)
class Components(Mapping):
    """The five modules of an SD1.x/2.x pipeline, by attribute (`c.unet`) or by name as
    diffusers' `pipe.components` dict (`c["unet"]`, `dict(c)`, `**c`)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object

    def __getitem__(self, name: str) -> Any:
        if name not in COMPONENT_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(COMPONENT_NAMES)

    def __len__(self) -> int:
        return len(COMPONENT_NAMES)


COMPONENT_NAMES = tuple(f.name for f in fields(Components))


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    out, extra = {b: b for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = 256 + extra
            extra += 1
    return [chr(out[b]) for b in range(256)]


def write_tiny_tokenizer(directory: str | Path, words: tuple[str, ...] = TINY_WORDS) -> Path:
    """Write a small CLIP BPE vocab.json/merges.txt: byte alphabet plus merges that
    build each of `words` into one token."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        if len(word) < 2:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def tiny_components(seed: int = 0) -> Components:
    """Random-weight components with SD1.5's module names and a small size (CPU-friendly)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer(
            str(write_tiny_tokenizer(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
            model_max_length=77,
        )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    # SD1.5's scheduler settings.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    sharpen_attention(unet)
    for m in (unet, vae, text_encoder):
        m.eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def sharpen_attention(unet: torch.nn.Module, gain: float = TINY_QUERY_GAIN) -> None:
    """Scale a random-weight UNet's query projections by `gain`.

    Random projections give near-uniform attention maps, so the semantic map's argmax
    would be decided by float rounding. A trained model's maps are peaked; this makes
    a random one's peaked too, so tests compare the method, not rounding noise.
    """
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.to_q.weight.mul_(gain)


def _is_local(model: str) -> bool:
    return Path(model).expanduser().is_dir()


# Options of the hub download itself, which every loader takes (the tokenizer's and the
# scheduler's too); the other keywords are the models' own.
HUB_OPTIONS = ("cache_dir", "token", "force_download", "proxies")

# Components of a StableDiffusionPipeline this pipeline does not have: diffusers users
# pass `safety_checker=None` out of habit, so None is accepted and means what it says.
ABSENT_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def load_components(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
    variant: str | None = None,
    revision: str | None = None,
    use_safetensors: bool | None = None,
    **kwargs: Any,
) -> Components:
    """Load an SD1.x / SD2.x diffusers checkpoint (a local folder or a hub id).

    As diffusers' `DiffusionPipeline.from_pretrained`: a component passed by name
    (`unet=`, `vae=`, `text_encoder=`, `tokenizer=`, `scheduler=`) is used instead of
    loading it; `cache_dir`, `token`, `force_download` and `proxies` go to every loader,
    other keywords to each model's `from_pretrained`. Any scheduler config is converted
    to DDIM, the paper's sampler.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    given = {k: kwargs.pop(k) for k in COMPONENT_NAMES if k in kwargs}
    for name in ABSENT_COMPONENTS:
        if kwargs.pop(name, None) is not None:
            raise TypeError(f"MagicFacePipeline has no {name} (pass {name}=None or leave it "
                            "out; magicface_core.safety checks images after the call)")
    kwargs.pop("requires_safety_checker", None)
    src = str(Path(model).expanduser()) if _is_local(model) else model
    if local_files_only is None:
        local_files_only = _is_local(model)
    hub: dict[str, Any] = {"local_files_only": local_files_only}
    if revision is not None:
        hub["revision"] = revision
    hub.update({k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs})
    # Weights' options (diffusers' names), passed to each model as diffusers would.
    weights = {k: v for k, v in (("variant", variant), ("use_safetensors", use_safetensors))
               if v is not None}

    def load(name: str, loader: Callable[[], Any]) -> Any:
        return given[name] if name in given else loader()

    # diffusers' models take `torch_dtype`; transformers' (since v4.56) `dtype`, and log a
    # deprecation warning for `torch_dtype`.
    unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(
        src, subfolder="unet", torch_dtype=dtype, **hub, **weights, **kwargs))
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(
        src, subfolder="vae", torch_dtype=dtype, **hub, **weights, **kwargs))
    text_encoder = load("text_encoder", lambda: CLIPTextModel.from_pretrained(
        src, subfolder="text_encoder", dtype=dtype, **hub, **weights, **kwargs))
    tokenizer = load("tokenizer", lambda: CLIPTokenizer.from_pretrained(
        src, subfolder="tokenizer", **hub))
    scheduler = load("scheduler", lambda: DDIMScheduler.from_pretrained(
        src, subfolder="scheduler", **hub))
    for m in (unet, vae, text_encoder):
        m.to(device).eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def save_components(c: Components, directory: str | Path, *,
                    safe_serialization: bool = True, variant: str | None = None) -> Path:
    """Write a diffusers StableDiffusionPipeline-compatible folder (`variant`, e.g.
    "fp16", names the weight files as diffusers' `save_pretrained` does)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c.unet.save_pretrained(directory / "unet", safe_serialization=safe_serialization,
                           variant=variant)
    c.vae.save_pretrained(directory / "vae", safe_serialization=safe_serialization,
                          variant=variant)
    # transformers (v5) always writes safetensors; it keeps the variant option.
    c.text_encoder.save_pretrained(directory / "text_encoder", variant=variant)
    c.tokenizer.save_pretrained(directory / "tokenizer")
    c.scheduler.save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(c.scheduler).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory
