"""The fast loop against the reference loop, the K/V cache, and torch.compile."""

from __future__ import annotations

import pytest
import torch

from magicface_core import Concept, GenerationConfig, MagicFacePipeline
from magicface_core.ddim import ddim_coefficients, ddim_step
from magicface_core.kv_cache import KVEntry, ReferenceKVCache

from ..helpers.examples import example_concepts
from ..helpers.images import mask_image, noise_image
from ..helpers.pipeline import assert_latents_close, bias_form


def last_plan(pipe: MagicFacePipeline):
    """The plan (buffers, bias form) of the fast loop's latest call."""
    return pipe.fast_sampler.last_plan


@pytest.mark.parametrize("name,limit,alpha,extra", [
    ("trio", 3, 0.4, {}),
    ("synthetic", 2, 0.0, {}),
    ("solo", 1, 1.0, {}),
    ("trio", 2, 0.6, {"region_guidance": True, "ca_scale": 0.5}),
    ("trio", 2, 0.4, {"guidance_scale": 1.0}),
])
def test_fast_path_matches_reference_loop(pipe, name, limit, alpha, extra):
    # The dense bias form (the folded default has its own test below).
    prompt, concepts = example_concepts(name, limit)
    cfg = GenerationConfig(steps=6, height=128, width=128, seed=5, alpha=alpha, **extra)
    with bias_form(pipe, fold=False):
        fast = pipe.generate(prompt, concepts, cfg)
        plan = last_plan(pipe)
    assert not plan.folded and plan.buffers.bias_table
    slow = pipe.generate(prompt, concepts, cfg.replace(fast_path=False))
    assert_latents_close(fast.latents, slow.latents)
    assert len(fast.semantic_maps) == len(slow.semantic_maps) == 6
    # Label maps are argmaxes: allow a rare flip where two scores tie to rounding.
    for a, b in zip(fast.semantic_maps, slow.semantic_maps, strict=True):
        assert (a != b).float().mean() <= 0.05


@pytest.mark.parametrize("name,limit,alpha,extra", [
    ("trio", 3, 0.4, {}),
    ("synthetic", 2, 0.0, {"region_guidance": True}),
    ("solo", 1, 1.0, {"guidance_scale": 1.0}),
])
def test_folded_bias_fast_path_matches_reference_loop(pipe, name, limit, alpha, extra):
    prompt, concepts = example_concepts(name, limit)
    cfg = GenerationConfig(steps=5, height=128, width=128, seed=9, alpha=alpha, **extra)
    slow = pipe.generate(prompt, concepts, cfg.replace(fast_path=False))
    with bias_form(pipe, fold=True):
        fast = pipe.generate(prompt, concepts, cfg)
        plan = last_plan(pipe)
    # The folded plan really ran: query/key columns, no dense bias tables.
    assert plan.folded and not plan.buffers.bias_table
    assert_latents_close(fast.latents, slow.latents)
    for a, b in zip(fast.semantic_maps, slow.semantic_maps, strict=True):
        assert (a != b).float().mean() <= 0.05


def test_folding_only_the_fine_levels_matches_reference_loop(pipe):
    prompt, concepts = example_concepts("trio", 2)
    cfg = GenerationConfig(steps=4, height=128, width=128, seed=3, alpha=0.5)
    slow = pipe.generate(prompt, concepts, cfg.replace(fast_path=False))
    with bias_form(pipe, fold=True, min_tokens=16 * 16):
        fast = pipe.generate(prompt, concepts, cfg)
        plan = last_plan(pipe)
    # 128x128 pixels: a 16x16 latent. Only that level folds; the coarser one is dense.
    assert set(plan.folded) == {(16, 16)}
    assert set(plan.buffers.bias_table) == set(plan.levels) - {(16, 16)} != set()
    assert_latents_close(fast.latents, slow.latents)


def test_fold_min_tokens_rejects_negative(pipe):
    with pytest.raises(ValueError, match="fold_min_tokens"):
        pipe.fold_min_tokens = -1


def test_folded_bias_falls_back_for_weights_it_cannot_carry(pipe, monkeypatch):
    # Weights past the fold's range are above the request limit (20): lower the range.
    import magicface_core.sampling.fast as fast

    monkeypatch.setattr(fast, "MAX_FOLDED_WEIGHT", 2.0)
    prompt, concepts = example_concepts("trio", 1)
    concepts = [Concept(image=c.image, word=c.word, mask=c.mask, weight=5.0)
                for c in concepts]
    cfg = GenerationConfig(steps=2, height=64, width=64, seed=1)
    with bias_form(pipe, fold=True):
        fast = pipe.generate(prompt, concepts, cfg)
        plan = last_plan(pipe)
    assert not plan.folded and plan.buffers.bias_table
    slow = pipe.generate(prompt, concepts, cfg.replace(fast_path=False))
    assert_latents_close(fast.latents, slow.latents)


def test_fast_path_matches_without_concepts(pipe):
    cfg = GenerationConfig(steps=4, height=128, width=64, seed=2)
    fast = pipe.generate("a photo of a man", [], cfg)
    slow = pipe.generate("a photo of a man", [], cfg.replace(fast_path=False))
    assert_latents_close(fast.latents, slow.latents)


def test_ddim_step_equals_diffusers(pipe):
    from diffusers import DDIMScheduler

    for prediction_type in ("epsilon", "v_prediction"):
        sched = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
        sched.set_timesteps(7)
        coef = ddim_coefficients(sched, sched.timesteps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        for i, t in enumerate(sched.timesteps):
            out = torch.randn(1, 4, 8, 8, generator=g)
            want = sched.step(out, t, x, eta=0.0).prev_sample
            got = ddim_step(x, out, coef[i], prediction_type)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            x = want


def test_cache_hit_equals_cache_miss():
    pipe = MagicFacePipeline.tiny(seed=0)
    cache = pipe.enable_kv_cache()
    prompt, concepts = example_concepts("trio", 2)
    cfg = GenerationConfig(steps=5, height=128, width=128, seed=9)
    miss = pipe.generate(prompt, concepts, cfg)
    assert (miss.cache_hits, miss.cache_misses) == (0, 2)
    assert len(cache) == 2 and cache.stats.misses == 2
    hit = pipe.generate(prompt, concepts, cfg)
    assert (hit.cache_hits, hit.cache_misses) == (2, 0)
    assert_latents_close(hit.latents, miss.latents)
    # Reference K/V do not depend on the target prompt, mask or weight: a new prompt
    # and weight still hit and match an uncached run.
    other = [Concept(image=concepts[0].image, mask=concepts[0].mask, word="man", weight=1.5,
                     reference_prompt=concepts[0].reference_prompt),
             Concept(image=noise_image(3), mask=mask_image(box=(0, 0, 50, 50)), word="hat")]
    mixed = pipe.generate("a man in a hat", other, cfg)
    assert (mixed.cache_hits, mixed.cache_misses) == (1, 1)
    pipe.kv_cache = None
    uncached = pipe.generate("a man in a hat", other, cfg)
    assert_latents_close(mixed.latents, uncached.latents)


def test_cache_key_covers_what_changes_kv():
    pipe = MagicFacePipeline.tiny(seed=0)
    cache = pipe.enable_kv_cache()
    prompt, concepts = example_concepts("trio", 1)
    cfg = GenerationConfig(steps=3, height=128, width=128, seed=1)
    pipe.generate(prompt, concepts, cfg)
    for change in (dict(seed=2), dict(steps=4), dict(width=192)):
        assert pipe.generate(prompt, concepts, cfg.replace(**change)).cache_hits == 0
    # A pinned reference seed shares K/V across target seeds.
    pinned = cfg.replace(reference_seed=77)
    pipe.generate(prompt, concepts, pinned)
    assert pipe.generate(prompt, concepts, pinned.replace(seed=5)).cache_hits == 1
    assert cache.stats.hits >= 1


def _entry(nbytes_per_tensor: int, device="cpu") -> KVEntry:
    n = nbytes_per_tensor // 4
    return KVEntry([{"l": (torch.zeros(n, device=device), torch.zeros(n, device=device))}])


def test_cache_budget_evicts_least_recently_used():
    cache = ReferenceKVCache(device_bytes=0, host_bytes=3000)
    for key in "abc":
        cache.put(key, _entry(400))  # 800 bytes each
    assert len(cache) == 3 and cache.host_used == 2400
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", _entry(400))
    assert "b" not in cache and "a" in cache and "d" in cache
    assert cache.host_used <= 3000
    cache.put("huge", _entry(4000))
    assert "huge" not in cache and cache.stats.evictions >= 2
    assert cache.get("zzz") is None and cache.stats.misses == 1


@pytest.mark.slow  # inductor compiles for about 4 minutes on a 2-core CPU; runs in .ci/run
def test_compiled_path_equals_eager():
    pipe = MagicFacePipeline.tiny(seed=0)
    prompt, concepts = example_concepts("trio", 2)
    cfg = GenerationConfig(steps=3, height=128, width=128, seed=4)
    eager = pipe.generate(prompt, concepts, cfg)
    pipe.enable_compile()
    compiled = pipe.generate(prompt, concepts, cfg)
    assert pipe.is_compiled, "torch.compile fell back to eager on CPU"
    torch.testing.assert_close(compiled.latents, eager.latents, atol=1e-4, rtol=1e-3)
    # Both bias forms compile (the default is folded; the GPU benchmark times both).
    assert pipe.fold_attention_bias
    pipe.fold_attention_bias = False
    dense = pipe.generate(prompt, concepts, cfg)
    assert pipe.is_compiled, "torch.compile of the dense-bias path fell back to eager"
    torch.testing.assert_close(dense.latents, eager.latents, atol=1e-4, rtol=1e-3)


def test_fused_qkv_projections_give_the_same_image():
    pipe = MagicFacePipeline.tiny(seed=0)
    prompt, concepts = example_concepts("trio", 2)
    cfg = GenerationConfig(steps=4, height=128, width=128, seed=3, alpha=0.5)
    before = {fast: pipe.generate(prompt, concepts, cfg.replace(fast_path=fast)).latents
              for fast in (True, False)}
    vanilla = pipe.generate(prompt, [], cfg).latents
    pipe.fuse_qkv_projections()
    fused_modules = [m for m in pipe.unet.modules() if getattr(m, "fused_projections", False)]
    assert fused_modules and all(hasattr(m, "to_qkv") or hasattr(m, "to_kv")
                                 for m in fused_modules)
    # The fused weights are the ones in use: zeroing the unfused ones changes nothing.
    for m in fused_modules:
        for lin in (m.to_k, m.to_v) + ((m.to_q,) if hasattr(m, "to_qkv") else ()):
            lin.weight.data.zero_()
    for fast in (True, False):
        after = pipe.generate(prompt, concepts, cfg.replace(fast_path=fast)).latents
        torch.testing.assert_close(after, before[fast], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pipe.generate(prompt, [], cfg).latents, vanilla,
                               atol=2e-5, rtol=1e-4)


def test_compile_modes_with_their_own_cuda_graphs_are_refused(pipe):
    with pytest.raises(ValueError, match="own CUDA graphs"):
        pipe.enable_compile("reduce-overhead")
    with pytest.raises(ValueError, match="triton.cudagraphs"):
        pipe.enable_compile(options={"triton.cudagraphs": True})
    assert not pipe.is_compiled


def test_compile_options_reach_torch_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    pipe = MagicFacePipeline.tiny(seed=0)
    pipe.enable_compile(options={"conv_1x1_as_mm": True})
    pipe.enable_compile("max-autotune-no-cudagraphs")
    assert calls == [{"options": {"conv_1x1_as_mm": True}, "dynamic": False},
                     {"mode": "max-autotune-no-cudagraphs", "dynamic": False}]


def test_host_copy_of_a_cache_entry_keeps_every_tensor():
    g = torch.Generator().manual_seed(0)
    steps = [{"a": (torch.randn(1, 2, 4, 3, generator=g), torch.randn(1, 2, 4, 3, generator=g))}
             for _ in range(3)]
    host = KVEntry(steps).to_host()
    assert host.device.type == "cpu" and host.nbytes == KVEntry(steps).nbytes
    for s, h in zip(steps, host.steps, strict=True):
        for (k, v), (hk, hv) in zip(s.values(), h.values(), strict=True):
            assert torch.equal(k, hk) and torch.equal(v, hv)


def test_only_compiler_errors_switch_compilation_off(monkeypatch):
    """A compiler failure falls back to eager for good; any other error (an
    out-of-memory, a bug) propagates and leaves compilation on."""
    from torch._dynamo.exc import TorchDynamoException

    pipe = MagicFacePipeline.tiny(seed=0)
    prompt, concepts = example_concepts("trio", 2)
    cfg = GenerationConfig(steps=2, height=128, width=128, seed=4)
    eager = pipe.generate(prompt, concepts, cfg)

    def broken(error):
        def compile_(model, **kw):
            def run(*a, **k):
                raise error
            return run
        return compile_

    monkeypatch.setattr(torch, "compile", broken(RuntimeError("CUDA out of memory")))
    pipe.enable_compile()
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.generate(prompt, concepts, cfg)
    assert pipe.is_compiled
    monkeypatch.setattr(torch, "compile", broken(TorchDynamoException("backend failed")))
    pipe.enable_compile()
    fallback = pipe.generate(prompt, concepts, cfg)
    assert not pipe.is_compiled
    assert torch.equal(fallback.latents, eager.latents)


@pytest.mark.parametrize("fold", [True, False])
def test_rsa_steps_skip_the_map_when_nothing_reads_it(pipe, monkeypatch, fold):
    """Preset "paper" (no region guidance) without kept maps: the steps before the last
    RSA step record no attention map and make no semantic map; the image is the one
    made with every map, and the reference loop's."""
    import magicface_core.sampling.plan as plan_module

    made: list[int] = []
    real = plan_module.step_map

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "step_map", counting)
    prompt, concepts = example_concepts("trio", 2)
    cfg = GenerationConfig(steps=8, height=128, width=128, seed=2, alpha=0.5,
                           preset="paper", return_semantic_maps=False)
    with bias_form(pipe, fold=fold):
        lean = pipe.generate(prompt, concepts, cfg)
        assert lean.rsa_steps == 4 and lean.semantic_maps == []
        assert len(made) == 8 - (4 - 1)  # from the last RSA step on
        made.clear()
        full = pipe.generate(prompt, concepts, cfg.replace(return_semantic_maps=True))
        assert len(made) == 8
    assert_latents_close(lean.latents, full.latents, rel=1e-6)
    slow = pipe.generate(prompt, concepts, cfg.replace(fast_path=False))
    assert_latents_close(lean.latents, slow.latents)
    # Under "authors", region guidance reads the map at every step: nothing is skipped.
    made.clear()
    pipe.generate(prompt, concepts, cfg.replace(preset="authors"))
    assert len(made) == 8
