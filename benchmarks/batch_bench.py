"""Throughput of batching across requests, a lone job's latency with batching on, and
a worker's time to ready cold and with a warm compile cache (issue 15's targets).

    python benchmarks/batch_bench.py --out benchmarks/results/batch_h100.json
    python benchmarks/batch_bench.py --cpu --tiny --steps 3 --repeats 1   # CPU smoke run

Cases, one process, one model (SD1.5 architecture, random weights; or the tiny model):
- cached_n1: 8 jobs, one reference (a person) reused across 8 prompts and seeds, its
  K/V cached: one `generate` after another vs one `generate_batch` of 8;
- uncached_n2: 4 jobs, each with its own 2 references, no cache: one at a time vs a
  batch of 4;
- lone: a single job through `generate_batch` (the worker's path with batching on) vs
  `generate`.
Each batched image is checked against its solo image (relative error). With
--cold-start, two fresh processes warm the worker's shapes with an empty and then
the filled COMPILE_CACHE_DIR, and their time from start to ready is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_bench import PROMPT, measure, references, sd15_components  # noqa: E402

from magicface_core import GenerationConfig, MagicFacePipeline  # noqa: E402
from magicface_core.models import tiny_components  # noqa: E402
from magicface_core.pipeline import GenerationRequest  # noqa: E402

PROMPTS = [PROMPT, "a photo of " + PROMPT, PROMPT + " in the rain", PROMPT + " at night",
           "a painting of " + PROMPT, PROMPT + " on a beach", PROMPT + ", close up",
           PROMPT + " in a city"]


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> MagicFacePipeline:
    comps = tiny_components(0) if tiny else sd15_components(device, dtype)
    return MagicFacePipeline.from_components(comps, model_name="bench").to(device, dtype)


def jobs(n_jobs: int, n_concepts: int, cfg: GenerationConfig, own_refs: bool
         ) -> list[GenerationRequest]:
    """`n_jobs` requests: other prompts and seeds; one set of references, or (own_refs)
    each its own (the references' pixels shifted per job)."""
    out = []
    for j in range(n_jobs):
        refs = references(n_concepts)
        if own_refs:
            refs = [c.__class__(image=c.image.rotate(7 * (j + 1)), mask=c.mask, word=c.word,
                                weight=c.weight, reference_prompt=c.reference_prompt)
                    for c in refs]
        out.append(GenerationRequest(PROMPTS[j % len(PROMPTS)], refs, cfg.replace(seed=j)))
    return out


def throughput(pipe, requests, device, repeats: int) -> dict:
    """One at a time vs one batch: seconds, jobs per second, and the worst relative
    error of a batched image against its solo image."""
    def solo():
        return [pipe.generate(r.prompt, r.concepts, r.config) for r in requests]

    def batched():
        return pipe.generate_batch(requests, max_batch=len(requests))

    one = measure(solo, device, repeats, warmup=1)
    together = measure(batched, device, repeats, warmup=1)
    want, got = solo(), batched()
    err = max(float((g.latents.float() - w.latents.float()).norm() / w.latents.float().norm())
              for g, w in zip(got, want, strict=True))
    n = len(requests)
    return {"jobs": n, "one_at_a_time": one, "batched": together,
            "jobs_per_s_one_at_a_time": n / one["median_s"],
            "jobs_per_s_batched": n / together["median_s"],
            "speedup": one["median_s"] / together["median_s"], "max_rel_err": err}


COLD = """
import json, os, sys, time
t0 = time.monotonic()
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from worker.warmup import open_compile_cache, parse_shapes, warm_up, save_compile_cache
open_compile_cache(os.environ["COMPILE_CACHE_DIR"])
import torch
from batch_bench import build
from magicface_core import GenerationConfig
device = torch.device({device!r}); dtype = getattr(torch, {dtype!r})
pipe = build({tiny!r}, device, dtype)
pipe.enable_kv_cache()
if {inductor!r}:
    pipe.enable_compile()
loaded = time.monotonic() - t0
cfg = GenerationConfig(steps={steps}, height={size}, width={size}, return_semantic_maps=False)
warm_up(pipe, parse_shapes({shapes!r}), lambda s: cfg, {batch_max})
ready = time.monotonic() - t0
if {inductor!r}:
    save_compile_cache(os.environ["COMPILE_CACHE_DIR"])
print(json.dumps({{"load_s": loaded, "ready_s": ready, "compiled": pipe.is_compiled}}))
"""


def cold_start(args, device, dtype) -> dict:
    """Two fresh processes warming the same shapes: an empty COMPILE_CACHE_DIR, then the
    one the first filled."""
    size = args.size or (128 if args.tiny else 512)
    shapes = args.warmup_shapes or f"{size}x{size}:1"
    script = COLD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), device=str(device),
                         dtype=str(dtype).removeprefix("torch."), tiny=args.tiny,
                         inductor=args.cold_compile, steps=2, size=size, shapes=shapes,
                         batch_max=args.warmup_batch_max)
    out: dict = {"shapes": shapes, "batch_max": args.warmup_batch_max,
                 "inductor": args.cold_compile}
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items()
               if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        env["COMPILE_CACHE_DIR"] = cache
        for name in ("cold", "warm"):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", script], env=env,
                                  capture_output=True, text=True, timeout=args.cold_timeout_s)
            if proc.returncode != 0:
                out[name] = {"error": proc.stderr[-1500:]}
                break
            out[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                         "process_s": time.perf_counter() - t}
            print(f"time to ready, {name} compile cache: {out[name]['ready_s']:.1f} s",
                  flush=True)
    if "ready_s" in out.get("warm", {}) and "ready_s" in out.get("cold", {}):
        out["warm_over_cold"] = out["warm"]["ready_s"] / out["cold"]["ready_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke runs)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inductor", action="store_true",
                   help="compile the UNet (every case, batched and not: same settings)")
    p.add_argument("--cases", default="cached_n1,uncached_n2,lone",
                   help="comma-separated: cached_n1, uncached_n2, lone")
    p.add_argument("--cold-start", action="store_true",
                   help="also time a worker's warm-up in two fresh processes")
    p.add_argument("--cold-compile", action="store_true",
                   help="the warm-up processes compile the UNet (what the cache keeps)")
    p.add_argument("--warmup-shapes", default=None, help="default: SIZExSIZE:1")
    p.add_argument("--warmup-batch-max", type=int, default=1)
    p.add_argument("--cold-timeout-s", type=float, default=420)
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (128 if args.tiny else 512)
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "size": size, "steps": args.steps,
        "model": "tiny" if args.tiny else "SD1.5 architecture, random weights",
        "inductor": args.inductor, "cases": {}}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    pipe = build(args.tiny, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if args.inductor:
        pipe.enable_compile()
    cfg = GenerationConfig(steps=args.steps, guidance_scale=7.5, alpha=0.4, height=size,
                           width=size, return_semantic_maps=False, reference_seed=0)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
        pipe.kv_cache = None
        pipe.clear_plans()
        if case == "cached_n1":
            pipe.enable_kv_cache()
            stats = throughput(pipe, jobs(8, 1, cfg, own_refs=False), device, args.repeats)
        elif case == "uncached_n2":
            stats = throughput(pipe, jobs(4, 2, cfg, own_refs=True), device, args.repeats)
        elif case == "lone":
            (r,) = jobs(1, 2, cfg, own_refs=False)
            alone = measure(lambda r=r: pipe.generate(r.prompt, r.concepts, r.config),
                            device, args.repeats, warmup=1)
            batched = measure(lambda r=r: pipe.generate_batch([r]), device, args.repeats,
                              warmup=1)
            stats = {"generate": alone, "generate_batch": batched,
                     "ratio": batched["median_s"] / alone["median_s"]}
        else:
            raise SystemExit(f"unknown case {case!r}")
        result["cases"][case] = stats
        line = {k: round(v, 3) for k, v in stats.items() if isinstance(v, float)}
        print(case, line, flush=True)
        save()
    if args.cold_start:
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["cold_start"] = cold_start(args, device, dtype)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
