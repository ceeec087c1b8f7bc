"""Loading Stable Diffusion components, and the tiny random-weight SD1.5-shaped model."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Components", "load_components", "tiny_components", "write_tiny_tokenizer",
           "TINY_WORDS", "save_components", "sharpen_attention"]

# Whole-word tokens in the tiny tokenizer; every other word falls back to one token
# per character, so the tests see both single- and multi-token concept words.
TINY_QUERY_GAIN = 4.0

TINY_WORDS = ("a", "man", "woman", "girl", "hat", "with", "wearing", "vase", "photo", "of")


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object


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


def load_components(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
    variant: str | None = None,
    revision: str | None = None,
    use_safetensors: bool | None = None,
    **kwargs,
) -> Components:
    """Load an SD1.x / SD2.x diffusers checkpoint (a local folder or a hub id).

    Any scheduler config in the checkpoint is converted to DDIM, the paper's sampler.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = str(Path(model).expanduser()) if _is_local(model) else model
    if local_files_only is None:
        local_files_only = _is_local(model)
    kw = {"local_files_only": local_files_only}
    if revision is not None:
        kw["revision"] = revision
    # Weights' options (diffusers' names), passed to each model as diffusers would.
    weights = {k: v for k, v in (("variant", variant), ("use_safetensors", use_safetensors))
               if v is not None}
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype,
                                                **kw, **weights, **kwargs)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **kw,
                                        **weights, **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype,
                                                 **kw, **weights, **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    for m in (unet, vae, text_encoder):
        m.to(device).eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def save_components(c: Components, directory: str | Path) -> Path:
    """Write a diffusers StableDiffusionPipeline-compatible folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c.unet.save_pretrained(directory / "unet")
    c.vae.save_pretrained(directory / "vae")
    c.text_encoder.save_pretrained(directory / "text_encoder")
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
