"""MagicFace speed on one GPU: vanilla SD1.5, MagicFace (N = 1, 2, 3; K/V cached and
not; eager and CUDA-graph; dense and folded RSA/RBA bias), and the authors' compute
pattern, in one process.

    python benchmarks/gpu_bench.py --out benchmarks/results/h100.json
    python benchmarks/gpu_bench.py --cpu --tiny --repeats 1 --steps 3   # CPU smoke run

SD1.5-shaped components with random weights (speed does not depend on weight values),
512x512, 50 DDIM steps, CFG 7.5, end to end (prompt encoding, reference VAE encoding,
sampling, VAE decoding). Each case: warm-up runs (CUDA-graph capture, cache fill),
then the median of --repeats timed runs. Results are written after every case.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attention_bench import int_list  # noqa: E402
from authors_pattern import run_authors_pattern  # noqa: E402

from magicface_core import Concept, GenerationConfig, MagicFacePipeline  # noqa: E402
from magicface_core.models import (  # noqa: E402
    Components,
    sharpen_attention,
    tiny_components,
    write_tiny_tokenizer,
)

PROMPT = "a man with a hat wearing sunglasses"
# Inductor settings commonly used for diffusion UNets (no triton.cudagraphs: the fast
# loop captures its own graph around the compiled UNet).
TUNED_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                  "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}


def sd15_components(device: torch.device, dtype: torch.dtype) -> Components:
    """The real SD1.5 architecture (configs as published), random weights."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
            cross_attention_dim=768, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        sharpen_attention(unet)  # peaked maps, so the bias-form checks compare like a model
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
        )
        with tempfile.TemporaryDirectory() as tmp:
            tok = CLIPTokenizer(str(write_tiny_tokenizer(tmp, words=tuple(PROMPT.split()))
                                    / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                model_max_length=77)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
    # Keep activations finite in fp16: random init has no trained normalisation.
    for m in (unet, vae, text):
        m.to(dtype=dtype).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return Components(unet, vae, text, tok, sched)


def references(n: int) -> list[Concept]:
    ex = ROOT / "examples" / "synthetic"
    face = Image.open(ex / "face.png").convert("RGB")
    hat = Image.open(ex / "hat.png").convert("RGB")
    rng = np.random.default_rng(0)
    glasses = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    gmask = Image.new("L", glasses.size, 0)
    gmask.paste(255, (50, 60, 250, 140))
    all_refs = [
        Concept(image=face, mask=Image.open(ex / "face_mask.png"), word="man", weight=3.0,
                reference_prompt="a man"),
        Concept(image=hat, mask=Image.open(ex / "hat_mask.png"), word="hat", weight=2.0,
                reference_prompt="a man"),
        Concept(image=glasses, mask=gmask, word="sunglasses", weight=2.0,
                reference_prompt="a man wearing sunglasses"),
    ]
    return all_refs[:n]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times), "runs_s": times}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--preset", choices=("authors", "paper"), default="authors",
                   help="the method's preset (runs 1-4 predate presets: they timed what is "
                        "now 'paper')")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke runs)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--authors-repeats", type=int, default=3,
                   help="timed runs of the (slow, 5-10 s each) authors' pattern")
    p.add_argument("--no-diffusers-compile", action="store_true",
                   help="skip torch.compile of diffusers' pipeline (slow to compile)")
    p.add_argument("--inductor", action="store_true",
                   help="also time vanilla and MagicFace N=2 with the UNet compiled by "
                        "inductor inside our CUDA graph")
    p.add_argument("--inductor-n", type=int_list, default="2",
                   help="concept counts timed with --inductor (one compile per plan)")
    p.add_argument("--n", type=int_list, default="1,2,3",
                   help="concept counts for the eager and graph loops (comma list)")
    p.add_argument("--no-checks", action="store_true",
                   help="skip the GPU output and sync checks")
    p.add_argument("--no-eager", action="store_true", help="skip the eager loop cases")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' pipeline")
    p.add_argument("--authors-n", type=int_list, default="1,2,3",
                   help="concept counts for the authors' pattern (comma list, '' for none)")
    p.add_argument("--bias", default="dense,folded",
                   help="RSA/RBA bias forms timed for MagicFace (comma list): 'dense' (an "
                        "additive (Lq x Lk) SDPA mask) and/or 'folded' (extra head dims, "
                        "mask-free SDPA); folded cases are named '... [folded]'. The eager "
                        "loop times the first form only")
    p.add_argument("--inductor-bias", default=None,
                   help="bias forms for the inductor cases (default: --bias); each is "
                        "one compile per plan")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="fused Q/K/V projections for the whole run (vanilla cases too)")
    p.add_argument("--inductor-fuse-qkv", action="store_true",
                   help="after the inductor cases, fuse the Q/K/V projections and time "
                        "them again (vanilla too), named '... (inductor+graph, fused qkv)'")
    p.add_argument("--fused-bias", default=None,
                   help="bias forms for the fused-qkv inductor cases (default: the last "
                        "of --inductor-bias)")
    p.add_argument("--inductor-options", choices=("none", "tuned"), default="none",
                   help="'tuned': inductor options instead of mode 'default' (1x1 convs as "
                        "matmuls, coordinate-descent tuning; longer compiles)")
    p.add_argument("--channels-last", action="store_true",
                   help="UNet weights in channels_last memory format (whole run)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (whole run)")
    p.add_argument("--profile", action="store_true",
                   help="also record a kernel-time breakdown (torch.profiler) of one eager "
                        "N=2 run per bias form, uncached and cached")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="skip the remaining optional cases past this wall time")
    args = p.parse_args(argv)
    biases = _bias_list(args.bias)
    inductor_biases = biases if args.inductor_bias is None else _bias_list(args.inductor_bias)
    fused_biases = (inductor_biases[-1:] if args.fused_bias is None
                    else _bias_list(args.fused_bias))

    start = time.perf_counter()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (128 if args.tiny else 512)
    comps = tiny_components(0) if args.tiny else sd15_components(device, dtype)
    pipe = MagicFacePipeline.from_components(comps, model_name="bench").to(device, dtype)
    if args.fuse_qkv:
        pipe.fuse_qkv_projections()
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    cfg = GenerationConfig(steps=args.steps, guidance_scale=7.5, alpha=0.4, seed=1,
                           height=size, width=size, return_semantic_maps=False,
                           preset=args.preset)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "size": size, "steps": args.steps,
        "preset": args.preset,
        "model": "tiny" if args.tiny else "SD1.5 architecture, random weights",
        "repeats": args.repeats, "fuse_qkv": args.fuse_qkv,
        "channels_last": args.channels_last, "cudnn_benchmark": args.cudnn_benchmark,
        "inductor_options": TUNED_INDUCTOR if args.inductor_options == "tuned" else None,
        "cases": {},
    }

    def fresh() -> None:
        # Each case measures its own graphs and buffers: drop the previous case's.
        pipe.clear_plans()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def save() -> None:
        # After every case: a run cut off by its time limit keeps what it measured.
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    def record(name: str, stats: dict) -> None:
        result["cases"][name] = stats
        print(f"{name:<42} {stats.get('median_s', float('nan')):8.3f} s"
              + (f"  peak {stats['peak_gib']:.2f} GiB" if "peak_gib" in stats else ""),
              flush=True)
        save()

    def attempt(name: str, fn, repeats: int, warmup: int) -> bool:
        """Time one case; a failure is recorded and the run goes on (one broken case
        must not cost the rest of a device run)."""
        try:
            record(name, measure(fn, device, repeats, warmup))
            return True
        except Exception as e:  # noqa: BLE001 - reported in the result, not raised
            if device.type != "cuda":
                raise  # CPU smoke runs must fail loudly
            result["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{name:<42} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            pipe.kv_cache = None
            fresh()
            return False

    def over_budget() -> bool:
        return time.perf_counter() - start > args.budget_s

    rep, warm = args.repeats, args.warmup
    for graphs in (False, True):
        if not graphs and args.no_eager and device.type == "cuda":
            continue
        pipe.use_cuda_graphs = graphs
        tag = "graph" if graphs and device.type == "cuda" else "eager"
        if graphs and device.type != "cuda":
            break
        fresh()
        attempt(f"ours vanilla ({tag})", lambda: pipe.generate(PROMPT, [], cfg), rep, warm)
        # The eager loop is launch-bound: it times the first form only (keeps the
        # default run near the 5-minute mark).
        for bias in (biases if graphs else biases[:1]):
            use_bias(pipe, bias)
            for n in args.n:
                concepts = references(n)
                pipe.kv_cache = None
                fresh()
                attempt(case(f"magicface N={n} uncached", tag, bias),
                        lambda c=concepts: pipe.generate(PROMPT, c, cfg), rep, warm)
                pipe.enable_kv_cache()
                fresh()
                attempt(case(f"magicface N={n} cached", tag, bias),
                        lambda c=concepts: pipe.generate(PROMPT, c, cfg), rep, max(warm, 1))
                pipe.kv_cache = None

    # The CUDA-graph loop computes what the eager loop computes, and the folded bias
    # what the dense bias computes (up to fp16 rounding of w*sqrt(d)); no host-device
    # sync inside the step loop.
    if device.type == "cuda" and not args.no_checks:
        guarded(result, "output_check", lambda: output_check(pipe, cfg, fresh, result))
        guarded(result, "sync_check", lambda: sync_check(pipe, cfg, result))
    pipe.use_cuda_graphs = True

    # The authors' compute pattern: fp32, explicit attention, batch 2(1+N).
    a_rep = args.authors_repeats
    pipe32 = pipe.to(dtype=torch.float32) if dtype != torch.float32 else pipe
    for n in args.authors_n:
        if over_budget():
            print(f"skipping authors' pattern N={n}: over budget", flush=True)
            continue
        concepts = references(n)
        refs = pipe32.prepare_references(concepts, cfg)
        tokens = pipe32.concept_tokens(PROMPT, concepts)
        attempt(f"authors' pattern N={n} (fp32, explicit)",
                lambda r=refs, t=tokens: run_authors_pattern(pipe32, PROMPT, r, t, cfg),
                a_rep, 1)
    pipe.to(dtype=dtype)
    pipe.clear_plans()

    # Vanilla diffusers.
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder,
                                 tokenizer=pipe.tokenizer, unet=pipe.unet,
                                 scheduler=pipe.scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)

    def run_sd():
        sd(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=size,
           width=size, generator=torch.Generator("cpu").manual_seed(1))

    if not args.no_diffusers:
        attempt("diffusers SD1.5 (eager)", run_sd, rep, warm)
    if (device.type == "cuda" and not args.no_diffusers and not args.no_diffusers_compile
            and not over_budget()):
        unet = sd.unet
        sd.unet = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
        attempt("diffusers SD1.5 (compiled, reduce-overhead)", run_sd, rep, max(warm, 2))
        sd.unet = unet
    if args.inductor:
        # Every plan shape and bias form is a recompile of the same UNet code: keep
        # dynamo from falling back to eager after its default limit of 8.
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, 64)
        sections = [("inductor+graph", inductor_biases)]
        if args.inductor_fuse_qkv and not args.fuse_qkv:
            sections.append(("inductor+graph, fused qkv", fused_biases))
        for tag, forms in sections:
            if "fused" in tag:
                torch._dynamo.reset()
                pipe.fuse_qkv_projections()
            # One compile per plan shape (~30 s each on an H100 host): leave room.
            if args.inductor_options == "tuned":
                pipe.enable_compile(options=TUNED_INDUCTOR)
            else:
                pipe.enable_compile("default")
            pipe.use_cuda_graphs = True
            cases = [(f"ours vanilla ({tag})", [], False, "dense")]
            for bias in forms:
                for n in args.inductor_n:
                    # Cached first: its target is the tighter one.
                    cases += [(case(f"magicface N={n} cached", tag, bias),
                               references(n), True, bias),
                              (case(f"magicface N={n} uncached", tag, bias),
                               references(n), False, bias)]
            for name, cs, cached, bias in cases:
                if time.perf_counter() - start > args.budget_s - 60:
                    print(f"skipping {name}: over budget", flush=True)
                    continue
                pipe.kv_cache = None
                if cached:
                    pipe.enable_kv_cache()
                use_bias(pipe, bias)
                fresh()
                if attempt(name, lambda c=cs: pipe.generate(PROMPT, c, cfg), rep, 2):
                    result["cases"][name]["inductor_active"] = pipe.is_compiled
                    save()
            pipe.kv_cache = None
        # The profile below reads the eager kernels (of the fused projections, if the
        # fused section ran).
        pipe.disable_compile()
        result["profile_fused_qkv"] = len(sections) > 1 or args.fuse_qkv

    if args.profile and not over_budget():
        result["profiles"] = {}
        guarded(result, "profiles",
                lambda: profile_cases(pipe, device, cfg, biases, result["profiles"], save))

    summarize(result)
    result["wall_s"] = time.perf_counter() - start
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def guarded(result: dict, label: str, fn) -> None:
    """Run one check; on a GPU a failure is written into the result instead of ending
    the run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported in the result
        if not torch.cuda.is_available():
            raise
        result.setdefault("errors", {})[label] = f"{type(e).__name__}: {e}"[:500]
        print(f"{label} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)


def output_check(pipe, cfg: GenerationConfig, fresh, result: dict) -> None:
    concepts = references(2)
    outs = {}
    for graphs, fold in ((False, False), (True, False), (True, True)):
        pipe.use_cuda_graphs = graphs
        use_bias(pipe, "folded" if fold else "dense")
        fresh()
        outs[graphs, fold] = pipe.generate(PROMPT, concepts, cfg).latents.float()

    def rel(a, b) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    result["graph_vs_eager_rel_err"] = rel(outs[True, False], outs[False, False])
    result["folded_vs_dense_rel_err"] = rel(outs[True, True], outs[True, False])
    result["latents_finite"] = all(bool(torch.isfinite(o).all()) for o in outs.values())
    print(f"graph vs eager relative error {result['graph_vs_eager_rel_err']:.2e}, "
          f"folded vs dense {result['folded_vs_dense_rel_err']:.2e}, finite "
          f"{result['latents_finite']}", flush=True)


def sync_check(pipe, cfg: GenerationConfig, result: dict) -> None:
    """No host-device sync inside the step loop (warm plans: graphs already captured)."""
    checks = {}
    for graphs, fold in ((True, False), (True, True), (False, False), (False, True)):
        pipe.use_cuda_graphs = graphs
        use_bias(pipe, "folded" if fold else "dense")
        label = ("graph" if graphs else "eager") + (" [folded]" if fold else "")
        pipe.generate(PROMPT, references(2), cfg)
        try:
            with pipe.sync_check():
                pipe.generate(PROMPT, references(2), cfg)
            checks[label] = "no sync in the step loop"
        except RuntimeError as e:
            checks[label] = f"sync found: {e}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    result["sync_check"] = checks
    print("sync check:", checks, flush=True)


def profile_cases(pipe, device: torch.device, cfg: GenerationConfig, biases: list[str],
                  out: dict, save, top: int = 25) -> None:
    """Where one eager N=2 run spends its time: the top kernels by self device time (ops
    by self CPU time on a CPU run), per bias form, uncached and cached. Eager, so every
    kernel is seen."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Self time: kernels on a GPU (an aten op's kernels are its children), ops on a CPU.
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    graphs, fold = pipe.use_cuda_graphs, pipe.fold_attention_bias
    min_tokens = pipe.fold_min_tokens
    pipe.use_cuda_graphs = False
    try:
        for bias in biases:
            use_bias(pipe, bias)
            for cached in (False, True):
                pipe.kv_cache = pipe.enable_kv_cache() if cached else None
                concepts = references(2)
                pipe.generate(PROMPT, concepts, cfg)  # warm-up (fills the cache)
                sync(device)
                with profile(activities=activities) as prof:
                    pipe.generate(PROMPT, concepts, cfg)
                    sync(device)
                rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0),
                              reverse=True)[:top]
                name = f"N=2 {'cached' if cached else 'uncached'} (eager) [{bias}]"
                total = sum(getattr(e, key, 0.0) for e in prof.key_averages())
                out[name] = {"total_us": total, "top": [
                    {"op": e.key, "us": getattr(e, key, 0.0), "count": e.count}
                    for e in rows]}
                save()
                print(f"profile {name}:", flush=True)
                for e in rows[:12]:
                    print(f"  {getattr(e, key, 0.0) / 1e3:9.1f} ms  x{e.count:<6} {e.key[:90]}",
                          flush=True)
    finally:
        pipe.use_cuda_graphs, pipe.fold_attention_bias = graphs, fold
        pipe.fold_min_tokens = min_tokens
        pipe.kv_cache = None


def _bias_list(text: str) -> list[str]:
    out = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in out if not re.fullmatch(r"dense|folded(:\d+)?", b)]
    if bad:
        raise SystemExit(f"--bias: unknown form(s) {bad}; use dense, folded and/or "
                         "folded:TOKENS")
    return out


def use_bias(pipe, bias: str) -> None:
    """'dense', 'folded' (every modified level) or 'folded:T' (levels of >= T query
    tokens folded, coarser ones dense)."""
    pipe.fold_attention_bias = bias != "dense"
    pipe.fold_min_tokens = int(bias.split(":")[1]) if ":" in bias else 0


def case(what: str, tag: str, bias: str) -> str:
    """Case name; dense-bias names are the ones earlier result files use."""
    return f"{what} ({tag})" + ("" if bias == "dense" else f" [{bias}]")


def summarize(result: dict) -> None:
    """Per loop kind (eager, graph, inductor+graph) and bias form: the issue's target
    quantities."""
    c = {k: v["median_s"] for k, v in result["cases"].items() if "median_s" in v}
    authors = c.get("authors' pattern N=2 (fp32, explicit)")
    s: dict = {}
    for tag in ("eager", "graph", "inductor+graph", "inductor+graph, fused qkv"):
        van = c.get(f"ours vanilla ({tag})")
        vpeak = result["cases"].get(f"ours vanilla ({tag})", {}).get("peak_gib")
        forms = sorted({k.rsplit("[", 1)[1].rstrip("]") for k in c if k.endswith("]")})
        for bias in ["dense", *forms]:
            def m(what: str, b: str = bias, t: str = tag) -> float | None:
                return c.get(case(f"magicface {what}", t, b))

            d: dict = {}
            u2, c2 = m("N=2 uncached"), m("N=2 cached")
            if u2:
                d["n2_uncached_s"] = u2
                if authors:
                    d["speedup_vs_authors_pattern_n2"] = authors / u2
            if c2 and van:
                d["n2_cached_over_vanilla_same_loop"] = c2 / van
            if all(m(f"N={n} {k}") for n in (1, 3) for k in ("uncached", "cached")):
                d["uncached_cost_per_extra_concept_s"] = (m("N=3 uncached")
                                                          - m("N=1 uncached")) / 2
                d["cached_cost_per_extra_concept_s"] = (m("N=3 cached") - m("N=1 cached")) / 2
                peak = result["cases"][case("magicface N=3 uncached", tag, bias)].get(
                    "peak_gib")
                if peak and vpeak:
                    d["n3_uncached_peak_over_vanilla"] = peak / vpeak
            if d:
                s[tag if bias == "dense" else f"{tag} [{bias}]"] = d
    result["summary"] = s
    print("summary:", json.dumps(s, indent=2), flush=True)


if __name__ == "__main__":
    sys.exit(main())
