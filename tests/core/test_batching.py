"""Requests sampled together (`generate_batch`, the fast loop's `sample_batch`): each
image equals its solo image, a shared reference is computed once, a cancel or a bad
input stays with its own request."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from magicface_core import Concept, GenerationConfig, MagicFaceInputError, MagicFacePipeline
from magicface_core.pipeline import GenerationRequest
from magicface_core.sampling.fast import batch_key

from ..helpers.examples import example_concepts
from ..helpers.images import mask_image, noise_image
from ..helpers.pipeline import assert_latents_close, bias_form


@contextmanager
def kv_cache(pipe: MagicFacePipeline) -> Iterator[None]:
    """The shared pipeline with a fresh K/V cache for the block."""
    before = pipe.kv_cache
    pipe.enable_kv_cache()
    try:
        yield
    finally:
        pipe.kv_cache = before


def other_concepts(concepts: list[Concept], seed: int) -> list[Concept]:
    """The same words and weights with other reference images."""
    return [dataclasses.replace(c, image=noise_image(seed=seed + i),
                                mask=mask_image(box=(10, 10, 70, 60)))
            for i, c in enumerate(concepts)]


def variants(n: int, refs: str = "shared") -> list[GenerationRequest]:
    """Three requests of one shape: other prompts, seeds, guidance scales and weights.
    `refs`: "shared" (one set of references), "one_other" (the third request has its
    own), "distinct" (each request has its own)."""
    prompt, concepts = example_concepts("trio", n)
    # One reference seed (as the service runs): the references' noise, and so their
    # K/V, do not depend on each request's seed.
    base = GenerationConfig(steps=5, height=128, width=128, seed=3, alpha=0.5,
                            reference_seed=99)
    reweighted = [dataclasses.replace(c, weight=c.weight + 1.5) for c in concepts]
    third = concepts if refs == "shared" else other_concepts(concepts, 40)
    if refs == "distinct":
        reweighted = other_concepts(reweighted, 50)
    return [
        GenerationRequest(prompt, concepts, base),
        GenerationRequest("a photo of " + prompt, reweighted,
                          base.replace(seed=11, guidance_scale=5.0)),
        GenerationRequest(prompt + ", oil painting", third,
                          base.replace(seed=12, negative_prompt="blurry",
                                       return_semantic_maps=False)),
    ]


def solo(pipe: MagicFacePipeline, r: GenerationRequest):
    return pipe.generate(r.prompt, r.concepts, r.config)


def assert_same_image(got, want) -> None:
    assert_latents_close(got.latents, want.latents)
    assert len(got.semantic_maps) == len(want.semantic_maps)
    for a, b in zip(got.semantic_maps, want.semantic_maps, strict=True):
        assert (a != b).float().mean() <= 0.05  # an argmax may flip on a rounding tie
    assert got.config == want.config


@pytest.mark.parametrize("n,refs,fold", [
    (1, "shared", True), (2, "one_other", True), (3, "distinct", True),
    (2, "distinct", True), (2, "one_other", False), (3, "shared", False)])
def test_batched_requests_equal_their_solo_images(pipe, n, refs, fold):
    requests = variants(n, refs)
    with bias_form(pipe, fold=fold):
        want = [solo(pipe, r) for r in requests]
        got = pipe.generate_batch(requests)
        plan = pipe.fast_sampler.last_plan
    # One plan ran all three: three jobs in one UNet batch.
    assert plan.key.layout.jobs == 3 and plan.buffers.latents.shape[0] == 3
    assert bool(plan.folded) == fold
    for g, w in zip(got, want, strict=True):
        assert_same_image(g, w)
        assert g.image is not None and g.image.size == (128, 128)
    assert got[2].semantic_maps == []  # it did not ask for them
    # Different seeds, prompts and scales: really three different images.
    assert not torch.allclose(got[0].latents, got[1].latents)


def test_a_reference_shared_by_requests_rides_once(pipe):
    # Requests 0 and 1 share both references (same image, prompt and noise: the
    # weights differ, but the references' K/V do not depend on them); request 2 has
    # its own. Rows 0-5 are the three targets' (uncond, cond) pairs.
    got = pipe.generate_batch(variants(2, "one_other"))
    plan = pipe.fast_sampler.last_plan
    assert plan.buffers.refs.shape[0] == 4
    assert plan.key.layout.ref_rows == ((6, 8), (6, 8), (7, 9))
    assert all(not isinstance(g, Exception) for g in got)
    pipe.generate_batch(variants(2, "shared"))
    assert pipe.fast_sampler.last_plan.key.layout.ref_rows == ((6, 7),) * 3


def test_batched_requests_with_the_kv_cache(pipe):
    """Cached references (the production pattern: one person, many prompts), mixed
    with a reference that is not cached yet."""
    requests = variants(2)
    other = other_concepts(requests[1].concepts, 70)[1]
    mixed = dataclasses.replace(requests[1], concepts=[requests[1].concepts[0], other])
    with kv_cache(pipe):
        first = solo(pipe, requests[0])  # fills the cache with both references
        assert (first.cache_hits, first.cache_misses) == (0, 2)
        want = [solo(pipe, r) for r in (requests[0], mixed, requests[2])]
        pipe.kv_cache.clear()
        solo(pipe, requests[0])
        got = pipe.generate_batch([requests[0], mixed, requests[2]])
        plan = pipe.fast_sampler.last_plan
    # Concept 1 of the mixed request rides (not cached); everything else is a slot.
    lay = plan.key.layout
    assert lay.ref_rows == ((None, None), (None, 6), (None, None))
    assert lay.ref_slots == ((0, 1), (0, None), (0, 1))
    assert [(g.cache_hits, g.cache_misses) for g in got] == [(2, 0), (1, 1), (2, 0)]
    for g, w in zip(got, want, strict=True):
        assert_same_image(g, w)


def test_a_canceled_request_leaves_the_batch_alone(pipe):
    requests = variants(2)
    want = [solo(pipe, r) for r in requests]
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    class Canceled(Exception):
        pass

    def on_step(j: int):
        def report(step: int, total: int) -> None:
            seen[j].append(step)
            if j == 1 and step == 2:
                raise Canceled

        return report

    got = pipe.generate_batch([dataclasses.replace(r, on_step=on_step(j))
                               for j, r in enumerate(requests)])
    assert isinstance(got[1], Canceled)
    assert seen == {0: [1, 2, 3, 4, 5], 1: [1, 2], 2: [1, 2, 3, 4, 5]}
    assert_same_image(got[0], want[0])
    assert_same_image(got[2], want[2])


def test_every_request_canceled_stops_the_loop(pipe):
    steps: list[int] = []

    def stop(step: int, total: int) -> None:
        steps.append(step)
        raise KeyError("stop")

    got = pipe.generate_batch([dataclasses.replace(r, on_step=stop) for r in variants(1)])
    assert all(isinstance(g, KeyError) for g in got)
    assert steps == [1, 1, 1]  # each reported its first step once, then the loop ended


def test_an_invalid_request_fails_alone(pipe):
    requests = variants(1)
    bad = dataclasses.replace(requests[1], prompt="a landscape")  # no concept word
    want = [solo(pipe, requests[0]), solo(pipe, requests[2])]
    got = pipe.generate_batch([requests[0], bad, requests[2]])
    assert isinstance(got[1], MagicFaceInputError)
    assert_same_image(got[0], want[0])
    assert_same_image(got[2], want[1])


def test_requests_of_other_shapes_run_in_their_own_batches(pipe):
    a, b, c = variants(1)
    small = dataclasses.replace(b, config=b.config.replace(height=64, width=64))
    two = variants(2)[0]
    want = [solo(pipe, r) for r in (a, small, c, two)]
    got = pipe.generate_batch([a, small, c, two], max_batch=2)
    for g, w in zip(got, want, strict=True):
        assert_same_image(g, w)
    assert got[1].image.size == (64, 64)


def test_max_batch_splits_a_group(pipe):
    requests = variants(1)
    want = [solo(pipe, r) for r in requests]
    got = pipe.generate_batch(requests, max_batch=2)
    assert pipe.fast_sampler.last_plan.key.layout.jobs == 1  # 2 + 1
    for g, w in zip(got, want, strict=True):
        assert_same_image(g, w)
    with pytest.raises(ValueError, match="max_batch"):
        pipe.generate_batch(requests, max_batch=0)


def test_sample_batch_refuses_calls_of_different_shapes(pipe):
    a, b, _ = variants(1)
    prepared = [pipe._prepare(a), pipe._prepare(dataclasses.replace(
        b, config=b.config.replace(steps=4)))]
    assert batch_key(prepared[0].call) != batch_key(prepared[1].call)
    with pytest.raises(ValueError, match="batch_key"):
        pipe.fast_sampler.sample_batch([p.call for p in prepared], pipe.vae, "tiny")


def test_a_batch_out_of_memory_runs_one_by_one(pipe, monkeypatch):
    requests = variants(1)
    want = [solo(pipe, r) for r in requests]
    real = pipe.fast_sampler.sample_batch
    sizes: list[int] = []

    def tight_memory(calls, *args, **kwargs):
        sizes.append(len(calls))
        if len(calls) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(calls, *args, **kwargs)

    monkeypatch.setattr(pipe.fast_sampler, "sample_batch", tight_memory)
    got = pipe.generate_batch(requests)
    assert sizes == [3, 1, 1, 1]
    for g, w in zip(got, want, strict=True):
        assert_same_image(g, w)


def test_step_end_callbacks_edit_their_own_request(pipe):
    requests = variants(1)
    calls: list[tuple[int, int]] = []

    def zero_at(j: int):
        def cb(i, t, latents):
            calls.append((j, i))
            return torch.zeros_like(latents) if (j == 0 and i == 4) else None

        return cb

    want = solo(pipe, requests[1])
    got = pipe.generate_batch([dataclasses.replace(r, on_step_end=zero_at(j))
                               for j, r in enumerate(requests)])
    assert torch.count_nonzero(got[0].latents) == 0
    assert_same_image(got[1], want)
    assert sorted(calls) == [(j, i) for j in range(3) for i in range(5)]


def test_num_images_per_prompt_samples_together(pipe):
    prompt, concepts = example_concepts("trio", 2)
    out = pipe(prompt, concepts, num_inference_steps=4, height=128, width=128,
               num_images_per_prompt=3, seed=21)
    assert pipe.fast_sampler.last_plan.key.layout.jobs == 3
    for i, r in enumerate(out.results):
        one = pipe.generate(prompt, concepts, r.config)
        assert r.config.seed == 21 + i
        assert_latents_close(r.latents, one.latents)
