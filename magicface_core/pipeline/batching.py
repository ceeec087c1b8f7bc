"""`generate_batch`: requests grouped by call shape, sampled in UNet batches of at most
`max_batch`, a batch that runs out of GPU memory run again one request at a time."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..sampling import sample_reference
from ..sampling.fast import batch_key
from .results import GenerationRequest, MagicFaceResult, PreparedRequest

# The package's name, not this module's: the records keep the logger they had before
# the pipeline became a package.
log = logging.getLogger(__package__)

Outcome = MagicFaceResult | Exception


class BatchingMixin:
    """`MagicFacePipeline.generate_batch` and the grouping `__call__` shares."""

    def generate_batch(self, requests: Sequence[GenerationRequest],
                       max_batch: int = 8) -> list[MagicFaceResult | Exception]:
        """Several requests, as a server batches them: each request's result is what
        `generate` gives for it (to float tolerance), or the exception it raised (bad
        input, or one from its own callback: a cancel) without disturbing the others.

        Requests that share a call shape (`batch_key`: size, steps, concept count,
        preset options; prompts, seeds, guidance scales, references and weights may
        differ) run on the fast loop together, up to `max_batch` per UNet batch, and a
        reference several of them share is computed once. If a batch runs out of GPU
        memory, its requests run one by one.
        """
        try:
            results = self._sample_many(requests, max_batch)
            for out in results:
                if isinstance(out, MagicFaceResult):
                    out.image = self.decode(out.latents)
        finally:
            self.maybe_free_model_hooks()
        return results

    def _sample_many(self, requests: Sequence[GenerationRequest],
                     max_batch: int) -> list[MagicFaceResult | Exception]:
        """`generate_batch` up to the final latents (nothing decoded)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        results: list[MagicFaceResult | Exception | None] = [None] * len(requests)
        with self._lock:
            groups: dict[tuple, list[tuple[int, PreparedRequest]]] = {}
            for idx, r in enumerate(requests):
                try:
                    job = self._prepare(r)
                except Exception as e:  # noqa: BLE001 - that request's result
                    results[idx] = e
                    continue
                key = batch_key(job.call) if job.fast else ("reference loop", idx)
                groups.setdefault(key, []).append((idx, job))
            for members in groups.values():
                for start in range(0, len(members), max_batch):
                    chunk = members[start : start + max_batch]
                    for idx, out in self._run_chunk(chunk, requests):
                        results[idx] = out
        return results  # type: ignore[return-value]

    def _run_chunk(self, chunk: list[tuple[int, PreparedRequest]],
                   requests: Sequence[GenerationRequest]) -> list[tuple[int, Outcome]]:
        """(request index, result or exception) for requests sampled together; a
        batch that runs out of GPU memory is run again one request at a time."""
        r = [requests[idx] for idx, _ in chunk]
        jobs = [job for _, job in chunk]
        try:
            if not jobs[0].fast:
                (idx, job), = chunk
                out = sample_reference(self.unet, self.vae, job.call, r[0].on_step,
                                       r[0].on_step_end)
                return [(idx, job.result(out))]
            outs = self.fast_sampler.sample_batch(
                [j.call for j in jobs], self.vae, self.model_name, [x.on_step for x in r],
                self.kv_cache, self.use_cuda_graphs, [x.on_step_end for x in r])
        except torch.cuda.OutOfMemoryError as e:
            if len(chunk) == 1:
                return [(chunk[0][0], e)]
            torch.cuda.empty_cache()
            log.warning("a batch of %d ran out of GPU memory; running it one by one",
                        len(chunk))
            return [pair for one in chunk for pair in self._run_chunk([one], requests)]
        except Exception as e:  # noqa: BLE001 - a failure of the batch is each one's
            return [(idx, e) for idx, _ in chunk]
        return [(idx, out if isinstance(out, Exception) else job.result(out))
                for (idx, job), out in zip(chunk, outs, strict=True)]
