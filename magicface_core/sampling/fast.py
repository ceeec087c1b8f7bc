"""The fast sampling loop: the reference loop's method and output, arranged for speed.

- Every per-step input lives in a static buffer and a step is a function of those
  buffers only (see plan.py): RSA/RBA biases are made once per call, the semantic
  map's argmax uses fixed-size token tables, DDIM coefficients are precomputed. No
  host-device sync inside the loop, so on CUDA each call signature's step is captured
  once as a CUDA graph and replayed.
- Reference K/V come from the cache when a reference was seen before; only the
  missing references ride in the UNet batch, and their K/V are stored on the way.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..attention import MAX_FOLDED_WEIGHT, BatchLayout, installed_processors
from ..ddim import ddim_coefficients
from ..kv_cache import KVEntry, ReferenceKVCache, reference_cache_key
from .graphs import CompiledUNet, run_step
from .plan import Plan, PlanKey
from .prepare import PreparedCall, noisy_references
from .steps import SampleOutput, StepEndCallback

__all__ = ["FastSampler"]

MAX_PLANS = 4


class FastSampler:
    """Runs calls on one UNet; keeps a few plans (buffers and captured graphs) by call
    signature. Knows nothing of the pipeline: a call comes in prepared."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.unet_call = CompiledUNet(unet)
        self.plans: OrderedDict[PlanKey, Plan] = OrderedDict()
        # Fold RSA/RBA's bias into extra head dims (mask-free SDPA) instead of passing a
        # dense (Lq x Lk) bias: faster on an H100 (benchmarks/README.md).
        self.fold_bias = True
        # Fold only levels with at least this many query tokens; coarser levels keep the
        # dense bias (there the bias is small and the wider head dim can cost more).
        self.fold_min_tokens = 0
        self._check_syncs = False

    # -- switches ---------------------------------------------------------------------
    @property
    def is_compiled(self) -> bool:
        return self.unet_call.is_compiled

    def enable_compile(self, mode: str = "default", options: dict | None = None) -> None:
        self.unet_call.enable(mode, options)
        self.clear_plans()

    def disable_compile(self) -> None:
        self.unet_call.disable()
        self.clear_plans()

    def clear_plans(self) -> None:
        self.plans.clear()

    @property
    def last_plan(self) -> Plan | None:
        """The plan of the latest call (what it allocated and folded)."""
        return next(reversed(self.plans.values()), None)

    @contextmanager
    def sync_check(self) -> Iterator[None]:
        """Within the block, any host-device sync inside the step loop is an error
        (CUDA only; a benchmark check)."""
        self._check_syncs = True
        try:
            yield
        finally:
            self._check_syncs = False

    # -- one call ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, call: PreparedCall, vae, model_name: str,
               on_step: Callable[[int, int], None] | None, cache: ReferenceKVCache | None,
               use_graphs: bool, on_step_end: StepEndCallback | None = None) -> SampleOutput:
        device = call.latents.device
        use_graphs = use_graphs and device.type == "cuda"
        keys, entries = self._lookup(call, cache, model_name)
        riding = [i for i in range(call.n) if entries[i] is None]
        cached = [i for i in range(call.n) if entries[i] is not None]
        embeds = (call.prompt_embeds if not riding
                  else torch.cat([call.prompt_embeds, call.reference_embeds[riding]]))
        plan = self._plan(call, riding, entries, embeds, use_graphs)
        plan.fill(call, embeds)
        noisy = noisy_references(vae, call, riding)
        store: dict[int, list] = {i: [] for i in riding} if cache is not None else {}
        maps = self._loop(plan, call, noisy, entries, cached, store, on_step, use_graphs,
                          on_step_end)
        for j, steps in store.items():
            cache.put(keys[j], KVEntry(steps))
        return SampleOutput(plan.buffers.latents.clone(), maps, len(cached),
                            len(riding) if cache is not None else 0)

    def _lookup(self, call: PreparedCall, cache: ReferenceKVCache | None, model_name: str):
        """Each concept's cache key and entry (None: not cached, or no cache)."""
        n = call.n
        keys: list[str | None] = [None] * n
        entries: list[KVEntry | None] = [None] * n
        if cache is None:
            return keys, entries
        schedule = repr(sorted(call.scheduler.config.items()))
        for i, r in enumerate(call.refs):
            noise_id: int | str = call.reference_seed
            if call.reference_noise is not None:
                noise_id = "noise:" + hashlib.sha256(
                    call.reference_noise[:, i].float().cpu().contiguous().numpy().tobytes()
                ).hexdigest()
            keys[i] = reference_cache_key(
                model=model_name, image=np.asarray(r.image), prompt=r.prompt,
                height=call.config.height, width=call.config.width, steps=call.config.steps,
                noise_seed=noise_id, concept_index=i, layers=call.config.reference_layers,
                dtype=call.latents.dtype, schedule=schedule)
            entries[i] = cache.get(keys[i])
        return keys, entries

    def _plan(self, call: PreparedCall, riding: list[int], entries: list,
              embeds: torch.Tensor, use_graphs: bool) -> Plan:
        c = call.config
        # The folded bias carries weights up to MAX_FOLDED_WEIGHT; beyond, dense.
        fold = (self.fold_bias and call.n > 0
                and all(abs(r.weight) <= MAX_FOLDED_WEIGHT for r in call.refs))
        key = PlanKey(
            latent_hw=call.latent_hw, map_hw=call.map_hw,
            layout=BatchLayout.build(call.do_cfg, call.n, riding, call.foreground),
            riding=tuple(riding), reference_layers=c.reference_layers,
            embeds_shape=tuple(embeds.shape), dtype=str(call.latents.dtype).removeprefix(
                "torch."), device=str(call.latents.device),
            prediction_type=call.scheduler.config.get("prediction_type", "epsilon"),
            map_options=(c.map_refinement, c.map_aggregation, c.foreground_mask),
            guidance_options=(c.region_guidance, c.region_guidance_min,
                              c.region_guidance_max, c.region_guidance_cap),
            use_graphs=use_graphs, compiled=self.is_compiled, fold=fold,
            fold_min_tokens=self.fold_min_tokens)
        if key in self.plans:
            self.plans.move_to_end(key)
            return self.plans[key]
        plan = Plan.build(key, self.unet, entries, call.tables[0].numel() if call.n else 0)
        self.plans[key] = plan
        while len(self.plans) > MAX_PLANS:
            self.plans.popitem(last=False)
        return plan

    def _loop(self, plan: Plan, call: PreparedCall, noisy, entries, cached, store,
              on_step, use_graphs: bool, on_step_end: StepEndCallback | None = None
              ) -> list[torch.Tensor]:
        """The steps: each call's inputs copied into the buffers, then the step run
        (eagerly or by graph replay). Returns the semantic maps (CPU) when kept."""
        b, steps, device = plan.buffers, call.config.steps, call.latents.device
        coef = ddim_coefficients(call.scheduler, call.timesteps).to(device)
        # The first RBA step needs the previous step's map: step 0 is always RSA.
        is_rsa = torch.arange(steps, device=device) < max(call.rsa_steps, 1)
        keep = call.n and call.config.return_semantic_maps
        maps = torch.zeros(steps, *call.map_hw, dtype=torch.long, device=device) if keep else None
        check = self._check_syncs and device.type == "cuda"
        with self._installed(plan, call):
            try:
                if check:
                    torch.cuda.set_sync_debug_mode("error")
                for i in range(steps):
                    b.t.copy_(call.timesteps[i])
                    b.coef.copy_(coef[i])
                    if noisy is not None:
                        b.refs.copy_(noisy[i])
                    for j in cached:
                        for name, (k, v) in entries[j].steps[i].items():
                            bk, bv = b.kv[name][j]
                            bk.copy_(k, non_blocking=True)
                            bv.copy_(v, non_blocking=True)
                    if b.is_rsa is not None:
                        b.is_rsa.copy_(is_rsa[i])
                    captured = run_step(plan, lambda: plan.step(self.unet_call, call),
                                        use_graphs)
                    if maps is not None:
                        maps[i].copy_(b.labels)
                    for j in store:
                        store[j].append({name: (kv[j][0].clone(), kv[j][1].clone())
                                         for name, kv in captured.items()})
                    if on_step_end is not None:
                        # The latents live in a static buffer (graphs replay on it): the
                        # callback gets a copy (one it keeps must not change under it
                        # at the next step), and what it returns, or its copy edited in
                        # place, is copied back in, never rebound.
                        latents = b.latents.clone()
                        edited = on_step_end(i, call.timesteps[i], latents)
                        b.latents.copy_(latents if edited is None else edited)
                    if on_step is not None:
                        on_step(i + 1, steps)
            finally:
                if check:
                    torch.cuda.set_sync_debug_mode(0)
        return [] if maps is None else list(maps.cpu())

    @contextmanager
    def _installed(self, plan: Plan, call: PreparedCall) -> Iterator[None]:
        if not call.n:
            yield
            return
        reference, other = plan.processors()
        with installed_processors(self.unet, call.config.reference_layers, reference, other):
            yield
