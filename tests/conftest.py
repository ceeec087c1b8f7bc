from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magicface_core import Concept, GenerationConfig, MagicFacePipeline

# The project's own drawn examples (scripts/make_examples.py): the suite needs nothing
# else. The public reference examples beside a checkout (../shared/examples, or
# MAGICFACE_EXAMPLES) are used too when they are there.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHARED_EXAMPLES = Path(os.environ.get(
    "MAGICFACE_EXAMPLES", Path(__file__).resolve().parents[2] / "shared" / "examples"))


def shared_example_names() -> list[str]:
    if not SHARED_EXAMPLES.is_dir():
        return []
    return sorted(p.parent.name for p in SHARED_EXAMPLES.glob("*/example.json"))


def example(name: str, root: Path = EXAMPLES) -> dict:
    """An example.json with absolute image/mask paths."""
    root = root / name
    data = json.loads((root / "example.json").read_text())
    for c in data["concepts"]:
        c["image"] = root / c["image"]
        c["mask"] = root / c["mask"]
    return data


def example_concepts(name: str, limit: int | None = None) -> tuple[str, list[Concept]]:
    data = example(name)
    cs = [Concept(image=c["image"], mask=c["mask"], word=c["word"], weight=c["weight"],
                  reference_prompt=c["reference_prompt"]) for c in data["concepts"][:limit]]
    return data["prompt"], cs


def assert_latents_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """The same computation up to float order: a relative error of the whole tensor
    (element-wise tolerances trip on near-zero entries when rows are batched apart)."""
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < rel, f"relative error {err:.2e} >= {rel:.0e}"


@pytest.fixture(scope="session")
def pipe() -> MagicFacePipeline:
    return MagicFacePipeline.tiny(seed=0)


@contextmanager
def bias_form(pipe: MagicFacePipeline, fold: bool, min_tokens: int = 0) -> Iterator[None]:
    """The fast loop's RSA/RBA bias form for a block; the shared pipeline's setting is
    restored after it."""
    before = pipe.fold_attention_bias, pipe.fold_min_tokens
    pipe.fold_attention_bias, pipe.fold_min_tokens = fold, min_tokens
    try:
        yield
    finally:
        pipe.fold_attention_bias, pipe.fold_min_tokens = before


@pytest.fixture
def small_config() -> GenerationConfig:
    return GenerationConfig(steps=5, height=128, width=128, seed=7)


def solid(color, size=(96, 80)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise_image(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask_image(size=(96, 80), box=None, value=255) -> Image.Image:
    m = Image.new("L", size, 0)
    if box is not None:
        m.paste(value, box)
    return m


def tiny_sam():
    """A random-weight Sam built from segment-anything's own classes, tiny encoder."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    img, patch, dim = 64, 16, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img, patch_size=patch, in_chans=3, embed_dim=32, depth=1, num_heads=2,
            mlp_ratio=2.0, out_chans=dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), act_layer=torch.nn.GELU,
            use_abs_pos=True, use_rel_pos=False, window_size=0, global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(img // patch, img // patch),
            input_image_size=(img, img), mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2),
            transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
        ),
    )
    return sam.eval()


# -- service fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server():
    from .stack import redis_url

    url, proc = redis_url()
    yield url
    if proc is not None:
        proc.terminate()


@pytest.fixture
def redis_db(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    from .stack import free_port

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def trio_job(n: int = 2) -> dict:
    data = example("trio")
    cs = data["concepts"][:n]
    return {
        "prompt": data["prompt"],
        "concepts": [{"word": c["word"], "weight": c["weight"],
                      "reference_prompt": c["reference_prompt"]} for c in cs],
        "images": [c["image"] for c in cs],
        "masks": [c["mask"] for c in cs],
    }
