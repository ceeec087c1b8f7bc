"""The fast sampling loop: the reference loop's method and output, arranged for speed.

- Every per-step input lives in a static buffer and a step is a function of those
  buffers only (see plan.py): RSA/RBA biases are made once per call, the semantic
  map's argmax uses fixed-size token tables, DDIM coefficients are precomputed. No
  host-device sync inside the loop, so on CUDA each call signature's step is captured
  once as a CUDA graph and replayed.
- Reference K/V come from the cache when a reference was seen before; only the
  missing references ride in the UNet batch, and their K/V are stored on the way.
- Calls of one shape (`batch_key`) can be sampled together, one UNet batch per step:
  a server's requests batched into one GPU call (`sample_batch`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from ..attention import MAX_FOLDED_WEIGHT, BatchLayout, installed_processors
from ..ddim import ddim_coefficients
from ..kv_cache import KVEntry, ReferenceKVCache, reference_cache_key
from .graphs import CompiledUNet, run_step
from .plan import Plan, PlanKey
from .prepare import PreparedCall, needs_map, noisy_references
from .steps import SampleOutput, StepEndCallback

__all__ = ["FastSampler", "batch_key"]

MAX_PLANS = 8


def batch_key(call: PreparedCall) -> tuple:
    """What calls sampled together must share: everything a step's shape and code
    depend on. Prompts, seeds, guidance scales, masks, weights, references and
    reference noise may differ."""
    c = call.config
    return (call.latent_hw, call.map_hw, call.n, call.do_cfg, call.foreground,
            c.reference_layers, str(call.latents.dtype), str(call.latents.device),
            repr(sorted(call.scheduler.config.items())), tuple(call.timesteps.tolist()),
            call.rsa_steps, c.map_refinement, c.map_aggregation, c.foreground_mask,
            c.region_guidance, c.region_guidance_min, c.region_guidance_max,
            c.region_guidance_cap, call.tables[0].numel() if call.n else 0,
            _foldable(call))


def _foldable(call: PreparedCall) -> bool:
    return all(abs(r.weight) <= MAX_FOLDED_WEIGHT for r in call.refs)


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
        # Plans kept (each with its buffers and, on CUDA, a captured graph): solo and
        # batched shapes of a few concept counts.
        self.max_plans = MAX_PLANS

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

    # -- calls ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_batch(self, calls: Sequence[PreparedCall], vae, model_name: str,
                     on_steps: Sequence[Callable[[int, int], None] | None] | None = None,
                     cache: ReferenceKVCache | None = None, use_graphs: bool = False,
                     on_step_ends: Sequence[StepEndCallback | None] | None = None,
                     ) -> list[SampleOutput | Exception]:
        """Calls of one `batch_key`, sampled together: one UNet batch per step holding
        every call's target rows and the distinct references not in the cache (a
        reference several calls share is computed once). Each call's result is its
        solo result (to float tolerance). A call whose callback raises gets that
        exception as its result and leaves the batch: its rows keep running (the
        captured graph stays valid) but nothing more is reported for it; the loop
        stops once no call is left."""
        calls = list(calls)
        if not calls:
            return []
        if len({batch_key(c) for c in calls}) != 1:
            raise ValueError("calls of different shapes cannot be sampled together: "
                             "group them by batch_key")
        on_steps = list(on_steps or [None] * len(calls))
        on_step_ends = list(on_step_ends or [None] * len(calls))
        first = calls[0]
        use_graphs = use_graphs and first.latents.device.type == "cuda"
        keys = [self._keys(c, model_name) for c in calls]
        layout, rows, slots = self._layout(calls, keys, cache)
        embeds = torch.cat([c.prompt_embeds for c in calls]
                           + [calls[j].reference_embeds[i : i + 1] for j, i, _ in rows])
        plan = self._plan(calls, layout, slots, embeds, use_graphs)
        plan.fill(calls, embeds)
        noisy = self._noisy(vae, calls, rows)
        keep = bool(first.n) and any(c.config.return_semantic_maps for c in calls)
        store = {row: [] for _, _, row in rows} if cache is not None else {}
        maps, errors, finished = self._loop(plan, calls, noisy, slots, store, on_steps,
                                            on_step_ends, use_graphs, keep)
        if finished:
            by_row = {row: keys[j][i] for j, i, row in rows}
            for row, steps in store.items():
                cache.put(by_row[row], KVEntry(steps))
        outputs: list[SampleOutput | Exception] = []
        latents = plan.buffers.latents
        for j, call in enumerate(calls):
            if errors[j] is not None:
                outputs.append(errors[j])
                continue
            hits = layout.ref_rows[j].count(None)  # concepts read from the cache
            outputs.append(SampleOutput(
                latents[j : j + 1].clone(),
                list(maps[:, j]) if maps is not None and call.config.return_semantic_maps
                else [], hits, call.n - hits if cache is not None else 0))
        return outputs

    def _keys(self, call: PreparedCall, model_name: str) -> list[str]:
        """Each concept's reference key: what its K/V depend on (the cache's key, and
        how calls sampled together find a reference they share)."""
        schedule = repr(sorted(call.scheduler.config.items()))
        keys = []
        for i, r in enumerate(call.refs):
            noise_id: int | str = call.reference_seed
            if call.reference_noise is not None:
                noise_id = "noise:" + hashlib.sha256(
                    call.reference_noise[:, i].float().cpu().contiguous().numpy().tobytes()
                ).hexdigest()
            keys.append(reference_cache_key(
                model=model_name, image=np.asarray(r.image), prompt=r.prompt,
                height=call.config.height, width=call.config.width, steps=call.config.steps,
                noise_seed=noise_id, concept_index=i, layers=call.config.reference_layers,
                dtype=call.latents.dtype, schedule=schedule))
        return keys

    @staticmethod
    def _layout(calls: list[PreparedCall], keys: list[list[str]],
                cache: ReferenceKVCache | None):
        """The batch layout: a cache slot for each distinct cached reference, a row for
        each distinct other one (concept-major, so that a concept's rows are
        consecutive). Returns (layout, rows [(job, concept, row)], the slots' entries)."""
        n, rows_per_job = calls[0].n, calls[0].target_rows
        base = rows_per_job * len(calls)
        ref_rows = [[None] * n for _ in calls]
        ref_slots = [[None] * n for _ in calls]
        row_of: dict[str, int] = {}
        slot_of: dict[str, int] = {}
        rows: list[tuple[int, int, int]] = []
        slots: list[KVEntry] = []
        for i in range(n):
            for j in range(len(calls)):
                key = keys[j][i]
                if key not in row_of and key not in slot_of:
                    entry = cache.get(key) if cache is not None else None
                    if entry is not None:
                        slot_of[key] = len(slots)
                        slots.append(entry)
                    else:
                        row_of[key] = base + len(rows)
                        rows.append((j, i, row_of[key]))
                if key in slot_of:
                    ref_slots[j][i] = slot_of[key]
                else:
                    ref_rows[j][i] = row_of[key]
        layout = BatchLayout(rows_per_job, tuple(map(tuple, ref_rows)),
                             tuple(map(tuple, ref_slots)), calls[0].foreground)
        return layout, rows, slots

    @staticmethod
    def _noisy(vae, calls: list[PreparedCall], rows) -> torch.Tensor | None:
        """The riding references noised to every step: (steps, rows, C, h, w), each
        job's encoded in one VAE batch."""
        if not rows:
            return None
        per_job: dict[int, list[int]] = {}
        for j, i, _ in rows:
            per_job.setdefault(j, []).append(i)
        noised = {j: noisy_references(vae, calls[j], idx) for j, idx in per_job.items()}
        return torch.cat([noised[j][:, per_job[j].index(i)][:, None] for j, i, _ in rows],
                         dim=1)

    def _plan(self, calls: list[PreparedCall], layout: BatchLayout, slots: list,
              embeds: torch.Tensor, use_graphs: bool) -> Plan:
        call = calls[0]
        c = call.config
        # The folded bias carries weights up to MAX_FOLDED_WEIGHT; beyond, dense.
        fold = self.fold_bias and call.n > 0 and _foldable(call)
        key = PlanKey(
            latent_hw=call.latent_hw, map_hw=call.map_hw, layout=layout,
            reference_layers=c.reference_layers,
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
        plan = Plan.build(key, self.unet, slots, call.tables[0].numel() if call.n else 0)
        self.plans[key] = plan
        while len(self.plans) > self.max_plans:
            self.plans.popitem(last=False)
        return plan

    def _loop(self, plan: Plan, calls: list[PreparedCall], noisy, slots: list, store,
              on_steps, on_step_ends, use_graphs: bool, keep_maps: bool):
        """The steps: each step's inputs copied into the buffers, then the step run
        (eagerly or by graph replay). Returns (the semantic maps (steps, jobs, h, w) on
        the CPU when kept, each job's error or None, whether every step ran)."""
        call = calls[0]
        b, steps, device = plan.buffers, call.config.steps, call.latents.device
        coef = ddim_coefficients(call.scheduler, call.timesteps).to(device)
        # The first RBA step needs the previous step's map: step 0 is always RSA.
        is_rsa = torch.arange(steps, device=device) < max(call.rsa_steps, 1)
        maps = (torch.zeros(steps, len(calls), *call.map_hw, dtype=torch.long, device=device)
                if keep_maps else None)
        errors: list[Exception | None] = [None] * len(calls)
        check = self._check_syncs and device.type == "cuda"
        ran = 0
        with self._installed(plan, call):
            try:
                if check:
                    torch.cuda.set_sync_debug_mode("error")
                for i in range(steps):
                    b.t.copy_(call.timesteps[i])
                    b.coef.copy_(coef[i])
                    if noisy is not None:
                        b.refs.copy_(noisy[i])
                    for slot, entry in enumerate(slots):
                        for name, (k, v) in entry.steps[i].items():
                            bk, bv = b.kv[name][slot]
                            bk.copy_(k, non_blocking=True)
                            bv.copy_(v, non_blocking=True)
                    if b.is_rsa is not None:
                        b.is_rsa.copy_(is_rsa[i])
                    with_map = bool(call.n) and any(needs_map(c, i) for c in calls)
                    captured = run_step(
                        plan, lambda m=with_map: plan.step(self.unet_call, calls, m),
                        use_graphs, variant=with_map)
                    ran = i + 1
                    if maps is not None:
                        maps[i].copy_(b.labels)
                    for row in store:
                        store[row].append({name: (kv[row][0].clone(), kv[row][1].clone())
                                           for name, kv in captured.items()})
                    self._report(b, calls, i, steps, on_steps, on_step_ends, errors)
                    if all(e is not None for e in errors):
                        break
            finally:
                if check:
                    torch.cuda.set_sync_debug_mode(0)
        return (None if maps is None else maps.cpu()), errors, ran == steps

    @staticmethod
    def _report(b, calls, i: int, steps: int, on_steps, on_step_ends, errors) -> None:
        """The jobs' step callbacks; a job whose callback raises leaves the batch."""
        for j, call in enumerate(calls):
            if errors[j] is not None:
                continue
            try:
                if on_step_ends[j] is not None:
                    # The latents live in a static buffer (graphs replay on it): the
                    # callback gets a copy (one it keeps must not change under it at
                    # the next step), and what it returns, or its copy edited in
                    # place, is copied back in, never rebound.
                    latents = b.latents[j : j + 1].clone()
                    edited = on_step_ends[j](i, call.timesteps[i], latents)
                    b.latents[j : j + 1].copy_(latents if edited is None else edited)
                if on_steps[j] is not None:
                    on_steps[j](i + 1, steps)
            except Exception as e:  # noqa: BLE001 - the job's own error, handed back
                errors[j] = e

    @contextmanager
    def _installed(self, plan: Plan, call: PreparedCall) -> Iterator[None]:
        """The plan's processors on the UNet for the block (calls of one batch share
        the reference layers)."""
        if not call.n:
            yield
            return
        reference, other = plan.processors()
        with installed_processors(self.unet, call.config.reference_layers, reference, other):
            yield
