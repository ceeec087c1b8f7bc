"""A byte-budgeted cache of reference-path keys/values, keyed by content hash.

A reference's K/V at the modified layers depend only on its letterboxed pixels, its
reference prompt, the model, the output size, the schedule and the reference noise
(seed, concept index): not on the mask, the weight or the target prompt. A hit lets
`generate` skip the reference rows of every UNet call.

Entries live on the GPU up to `device_bytes`, then spill (least recently used first)
to host memory up to `host_bytes`; beyond that they are dropped.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

__all__ = ["ReferenceKVCache", "KVEntry", "reference_cache_key", "CacheStats"]

# One entry: per step, per modified layer name, (K, V) of shape (1, heads, L, d).
StepKV = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class KVEntry:
    steps: list[StepKV]

    @cached_property  # entries are not mutated once built; the budget loop sums them often
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.steps for kv in s.values()
                   for t in kv)

    def to(self, device: torch.device | str) -> KVEntry:
        return KVEntry([{name: (k.to(device), v.to(device)) for name, (k, v) in s.items()}
                        for s in self.steps])

    def to_host(self) -> KVEntry:
        """A host copy; page-locked when it comes from a GPU, so that a later hit's
        per-step copies back (non_blocking) are real asynchronous transfers."""
        def host(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cuda":
                return t.to("cpu")
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)

        return KVEntry([{name: (host(k), host(v)) for name, (k, v) in s.items()}
                        for s in self.steps])

    @property
    def device(self) -> torch.device:
        for s in self.steps:
            for k, _ in s.values():
                return k.device
        return torch.device("cpu")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    spills: int = 0


def reference_cache_key(
    *,
    model: str,
    image: np.ndarray,
    prompt: str,
    height: int,
    width: int,
    steps: int,
    noise_seed: int | str,
    concept_index: int,
    layers: tuple[str, ...],
    dtype: torch.dtype,
    schedule: str = "",
) -> str:
    """Content hash of everything that determines a reference's K/V. `noise_seed` is the
    reference-noise seed, or a digest of explicitly given noise."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(image).tobytes())
    h.update(repr((image.shape, model, prompt, height, width, steps, noise_seed, concept_index,
                   layers, str(dtype), schedule)).encode())
    return h.hexdigest()


@dataclass
class ReferenceKVCache:
    device_bytes: int = 4 << 30
    host_bytes: int = 16 << 30
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.device_bytes < 0 or self.host_bytes < 0:
            raise ValueError("cache budgets must be >= 0")
        self._device: OrderedDict[str, KVEntry] = OrderedDict()
        self._host: OrderedDict[str, KVEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._device) + len(self._host)

    def __contains__(self, key: str) -> bool:
        return key in self._device or key in self._host

    @staticmethod
    def _bytes(d: OrderedDict[str, KVEntry]) -> int:
        return sum(e.nbytes for e in d.values())

    @property
    def device_used(self) -> int:
        return self._bytes(self._device)

    @property
    def host_used(self) -> int:
        return self._bytes(self._host)

    def get(self, key: str) -> KVEntry | None:
        with self._lock:
            for tier in (self._device, self._host):
                if key in tier:
                    tier.move_to_end(key)
                    self.stats.hits += 1
                    return tier[key]
            self.stats.misses += 1
            return None

    def put(self, key: str, entry: KVEntry) -> None:
        """Store an entry (already on its final device); GPU entries may spill to host."""
        size = entry.nbytes
        with self._lock:
            self._device.pop(key, None)
            self._host.pop(key, None)
            on_gpu = entry.device.type != "cpu"
            if on_gpu and size <= self.device_bytes:
                self._device[key] = entry
                while self._bytes(self._device) > self.device_bytes:
                    old_key, old = self._device.popitem(last=False)
                    self._put_host(old_key, old.to_host())
                    self.stats.spills += 1
            else:
                self._put_host(key, entry if not on_gpu else entry.to_host())

    def _put_host(self, key: str, entry: KVEntry) -> None:
        if entry.nbytes > self.host_bytes:
            self.stats.evictions += 1
            return
        self._host[key] = entry
        while self._bytes(self._host) > self.host_bytes:
            self._host.popitem(last=False)
            self.stats.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._device.clear()
            self._host.clear()
