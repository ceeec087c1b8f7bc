"""Run the authors' MagicFace code and ours on the same weights, inputs and noise, and
compare the final latents (preset "authors", both loops, dense and folded bias,
cached and uncached).

The authors' repository (CodeGoat24/MagicFace) has no licence, so none of it is in this
repository: pass a checkout with --authors-repo. Their pipeline class, attention
processors, attention store and `get_mask` are imported from it and driven the way
their script `magicface_stable_diffusion.py` drives them (its DDIM, their negative
prompt, `use_rate=True`, `inject_step = int(alpha * steps)`, layers 10..15), with the
tiny random-weight model at 128x128 unless --size says otherwise. Only what their
script does around the pipeline is redone here: reading images and masks (the same
formulas) and the z_T draw (given to both).

Their code hard-codes device='cuda' for two index tensors; on a machine without CUDA
this harness maps that device to the CPU while their pipeline runs. Their
visualisation-only imports (cv2, matplotlib, seaborn) are stubbed when absent; their
code needs `einops` (pip install einops).

    python benchmarks/authors_parity.py --authors-repo ../MagicFace --out parity.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from magicface_core import Concept, GenerationConfig, MagicFacePipeline, load_pipeline  # noqa: E402,E501
from magicface_core.config import AUTHORS_NEGATIVE_PROMPT  # noqa: E402

PROMPT = "a man with a hat wearing a vase"
# word, reference prompt, weight, mask box on a 128 x 128 canvas
CONCEPTS = [("man", "a man", 3.0, (8, 8, 90, 100)), ("hat", "a hat", 2.0, (30, 0, 128, 50)),
            ("vase", "a photo of a vase", 2.5, (0, 60, 70, 128))]
LAYER_IDX = [10, 11, 12, 13, 14, 15]  # up_blocks.2 and .3 in execution order


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self.__name__} is a stub (visualisation is off)")


def _stub_missing(*names: str) -> None:
    for name in names:
        top = name.split(".")[0]
        if top in sys.modules or importlib.util.find_spec(top) is None:
            sys.modules.setdefault(top, _Stub(top))
            sys.modules[name] = sys.modules.get(name) or _Stub(name)


@contextlib.contextmanager
def _cuda_literals_on_cpu():
    """Their `torch.tensor(..., device='cuda')` index tensors, on the CPU."""
    if torch.cuda.is_available():
        yield
        return
    real = torch.tensor

    def tensor(*a, **k):
        if str(k.get("device", "")).startswith("cuda"):
            k["device"] = "cpu"
        return real(*a, **k)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = real


def load_authors(repo: Path):
    import diffusers  # noqa: F401  (probes optional packages before any stub exists)

    for name in ("matplotlib", "matplotlib.pyplot", "seaborn", "cv2"):
        _stub_missing(name)
    sys.path.insert(0, str(repo))
    from magicface.hack_attention import AttentionStore, register_attention_control
    from magicface.reference_attention import ReferenceAttention
    from pipelines import pipeline_stable_diffusion_magicface as mod

    return SimpleNamespace(pipeline_cls=mod.StableDiffusionMagicFacePipeline, module=mod,
                           store=AttentionStore, register=register_attention_control,
                           reference_attention=ReferenceAttention)


def concepts(n: int, size: int) -> list[Concept]:
    rng = np.random.default_rng(0)
    out = []
    for word, ref, weight, box in CONCEPTS[:n]:
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, tuple(int(b * size / 128) for b in box))
        out.append(Concept(image=img, mask=mask, word=word, weight=weight,
                           reference_prompt=ref))
    return out


class Authors:
    """Their pipeline on our components, driven as their script drives it."""

    def __init__(self, authors, ours: MagicFacePipeline):
        from diffusers import DDIMScheduler

        self.a, self.ours = authors, ours
        # Their script's scheduler (their pipeline's constructor then sets steps_offset 1).
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
        self.pipe = authors.pipeline_cls(
            vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
            unet=ours.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.drawn: list[torch.Tensor] = []
        draw = authors.module.randn_tensor

        def recording(*a, **k):  # their per-step reference noise, kept to give to ours
            x = draw(*a, **k)
            self.drawn.append(x.clone())
            return x

        authors.module.randn_tensor = recording

    def run(self, cs: list[Concept], alpha: float, ca_scale: float, steps: int, size: int,
            z_t: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, dev = self.a, self.ours.device
        # Their utils.load_image / load_mask formulas (at the output size).
        images = [torch.from_numpy(np.array(c.image, dtype=np.uint8)).permute(2, 0, 1)[None]
                  .float().to(dev) / 127.5 - 1.0 for c in cs]
        masks = [(torch.from_numpy(np.array(c.mask, dtype=np.uint8))[None, None] / 255.0)
                 .to(torch.uint8).to(dev) for c in cs]
        z0 = [self.pipe.image2latent(im) for im in images]
        prompts = [PROMPT] + [c.reference_prompt for c in cs]
        ref_index = [t[0] for t in self.ours.concept_tokens(PROMPT, cs)]
        viz = SimpleNamespace(viz_mask=False, viz_attention_map=False,
                              viz_feature_correspondence=False)
        mrsa = a.reference_attention(start_step=0, end_step=steps, layer_idx=LAYER_IDX,
                                     ref_masks=masks, mask_weights=[c.weight for c in cs],
                                     inject_step=int(alpha * steps), viz_cfg=viz,
                                     ref_index=ref_index)
        store = a.store(H=size // 8)  # their sample_size: the latent side at native size
        before = dict(self.ours.unet.attn_processors)
        a.register(self.pipe, store, mrsa)
        self.drawn.clear()
        torch.manual_seed(seed)
        try:
            with _cuda_literals_on_cpu():
                out = self.pipe(prompt=prompts, latents=torch.cat([z_t.to(dev)] + z0),
                                guidance_scale=7.5,
                                negative_prompt=[AUTHORS_NEGATIVE_PROMPT] * len(prompts),
                                attention_store=store, use_rate=True, ref_index=ref_index,
                                ca_scale=ca_scale, viz_cfg=viz, num_inference_steps=steps,
                                height=size, width=size, output_type="latent").images
        finally:
            self.ours.unet.set_attn_processor(before)
        return out[:1], torch.stack(self.drawn)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors-repo", type=Path, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    ours = load_pipeline("tiny", device="cpu")
    authors = Authors(load_authors(args.authors_repo), ours)
    rows = []
    for n, alpha, ca in itertools.product((1, 2, 3), (0.4, 0.0), (0.6, 0.9, 0.95)):
        cs = concepts(n, args.size)
        z_t = torch.randn(1, 4, args.size // 8, args.size // 8,
                          generator=torch.Generator().manual_seed(n))
        want, noise = authors.run(cs, alpha, ca, args.steps, args.size, z_t, seed=100 + n)
        cfg = GenerationConfig(steps=args.steps, height=args.size, width=args.size,
                               alpha=alpha, ca_scale=ca)
        row: dict = {"concepts": n, "alpha": alpha, "ca_scale": ca}

        def ours_latents(config, fold=False, cs=cs, z_t=z_t, noise=noise):
            ours.fold_attention_bias = fold
            return ours.generate(PROMPT, cs, config, latents=z_t,
                                 reference_noise=noise).latents

        row["reference_loop"] = rel(ours_latents(cfg.replace(fast_path=False)), want)
        row["fast_dense"] = rel(ours_latents(cfg), want)
        row["fast_folded"] = rel(ours_latents(cfg, fold=True), want)
        cache = ours.enable_kv_cache()
        ours_latents(cfg, fold=True)  # fills the cache
        row["fast_folded_cached"] = rel(ours_latents(cfg, fold=True), want)
        row["cache_hits"] = cache.stats.hits
        ours.kv_cache = None
        row["paper_preset"] = rel(ours_latents(cfg.replace(preset="paper", ca_scale=None)), want)
        rows.append(row)
        print(json.dumps(row), flush=True)
    worst = max(max(r[k] for k in ("reference_loop", "fast_dense", "fast_folded",
                                   "fast_folded_cached")) for r in rows)
    summary = {"torch": torch.__version__, "size": args.size, "steps": args.steps,
               "worst_relative_error": worst, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"worst relative error of preset 'authors' vs their code: {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
