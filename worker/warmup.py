"""Cold start: the call shapes of WARMUP_SHAPES compiled and captured before the worker
reports ready, and inductor's compiled code kept in COMPILE_CACHE_DIR across starts.

A worker's first request of a new call shape pays for `torch.compile` (about a minute
per shape on an H100) and the CUDA-graph capture. Warming runs each listed shape with
synthetic references, alone and at BATCH_MAX jobs (each request with references of
its own), first with the references riding and then from the K/V cache (each a plan
of the fast loop), before the worker counts for /readyz. Other batch layouts (a batch
of fewer jobs, references shared or partly cached) change the UNet's batch only by
their number of riding rows: each new count compiles on first use, then comes from
the compile cache; a new layout of the same count only captures a graph.

With COMPILE_CACHE_DIR (a volume), inductor's on-disk caches live there and torch's
portable cache artefacts are saved there after warming and loaded at the next start,
so a restarted worker skips most of the compile.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("magicface.worker")

ARTEFACTS = "torch_cache_artifacts.bin"
_SHAPE = re.compile(r"^(\d+)x(\d+):(\d+(?:,\d+)*)$")
# The synthetic request's words, and a prompt holding them all (one concept per word).
WORDS = ("man", "hat", "vase", "girl")


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    concepts: int


def parse_shapes(text: str, max_concepts: int = len(WORDS)) -> list[Shape]:
    """WARMUP_SHAPES: "WIDTHxHEIGHT:N[,N...]", several separated by ";" (e.g.
    "512x512:1,2,3;768x512:1"). Raises ValueError naming the setting and the part."""
    shapes: list[Shape] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        m = _SHAPE.match(part.replace(" ", ""))
        if m is None:
            raise ValueError(f"WARMUP_SHAPES: {part!r} is not WIDTHxHEIGHT:N[,N...] "
                             "(e.g. 512x512:1,2,3)")
        w, h = int(m[1]), int(m[2])
        if w % 8 or h % 8 or w <= 0 or h <= 0:
            raise ValueError(f"WARMUP_SHAPES: {part!r}: width and height must be positive "
                             "multiples of 8")
        for n in (int(x) for x in m[3].split(",")):
            if not 0 <= n <= max_concepts:
                raise ValueError(f"WARMUP_SHAPES: {part!r}: concept counts must be in "
                                 f"[0, {max_concepts}]")
            if Shape(w, h, n) not in shapes:
                shapes.append(Shape(w, h, n))
    return shapes


def synthetic_request(shape: Shape, config, seed: int):
    """A request of `shape` with drawn references (no image files needed)."""
    import numpy as np
    from PIL import Image

    from magicface_core import Concept
    from magicface_core.pipeline import GenerationRequest
    from magicface_core.rules import DEFAULT_WEIGHT

    rng = np.random.default_rng(seed)
    words = WORDS[: shape.concepts]
    concepts = []
    for i, word in enumerate(words):
        pixels = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        mask = np.zeros((96, 96), dtype=np.uint8)
        mask[8 + 4 * i : 88, 8 : 88 - 4 * i] = 255
        concepts.append(Concept(image=Image.fromarray(pixels), mask=Image.fromarray(mask),
                                word=word, weight=DEFAULT_WEIGHT, reference_prompt=f"a {word}"))
    prompt = "a photo of " + " with ".join(f"a {w}" for w in words) if words else "a photo"
    return GenerationRequest(prompt, concepts, config.replace(seed=seed))


def warm_up(pipe, shapes: list[Shape], config_for, batch_max: int) -> float:
    """Run every shape alone and at `batch_max` jobs, uncached then cached; returns the
    seconds it took. `config_for(shape)` gives the config a request of that shape
    runs with (the service's defaults). The K/V cache is emptied afterwards: the
    synthetic references must not take a real one's place."""
    t = time.monotonic()
    sizes = sorted({1, batch_max})
    for shape in shapes:
        config = config_for(shape)
        for size in sizes:
            # Twice: the references riding, then read from the cache (another plan).
            # Each request has its own references, none cached at first.
            if pipe.kv_cache is not None:
                pipe.kv_cache.clear()
            for _ in range(2 if pipe.kv_cache is not None and shape.concepts else 1):
                requests = [synthetic_request(shape, config, seed) for seed in range(size)]
                for out in pipe.generate_batch(requests, max_batch=size):
                    if isinstance(out, Exception):
                        raise out
        log.info("warmed %dx%d with %d concept(s) (batches of %s)", shape.width,
                 shape.height, shape.concepts, "/".join(map(str, sizes)))
    if pipe.kv_cache is not None:
        pipe.kv_cache.clear()
    return time.monotonic() - t


def plans_needed(shapes: list[Shape], batch_max: int) -> int:
    """How many fast-loop plans warming makes (the sampler keeps at least these)."""
    sizes = len({1, batch_max})
    return sum(sizes * (2 if s.concepts else 1) for s in shapes)


# -- the compile cache ------------------------------------------------------------------
def open_compile_cache(directory: str | Path) -> bool:
    """Point inductor's and Triton's on-disk caches into `directory` (call before the
    first compile), and load the artefacts a previous start saved there. Returns
    whether artefacts were loaded."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    saved = root / ARTEFACTS
    if not saved.is_file():
        return False
    import torch

    try:
        # None when torch refuses the bytes (it logs why): a damaged or foreign file.
        info = torch.compiler.load_cache_artifacts(saved.read_bytes())
    except Exception as e:  # noqa: BLE001 - a stale or foreign cache: compile afresh
        info, why = None, e
    else:
        why = "unreadable"
    if info is None:
        log.warning("compile cache %s not loaded (%s); compiling afresh", saved, why)
        return False
    log.info("compile cache loaded from %s", saved)
    return True


def save_compile_cache(directory: str | Path) -> bool:
    """Save torch's portable cache artefacts of this process's compiles into
    `directory` (written to a temporary file, then renamed: a worker killed while
    saving leaves the previous file). Returns whether anything was saved."""
    import torch

    artefacts = torch.compiler.save_cache_artifacts()
    if artefacts is None:
        return False
    data = artefacts[0]
    root = Path(directory)
    tmp = root / f".{ARTEFACTS}.{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(root / ARTEFACTS)
    log.info("compile cache saved to %s (%d bytes)", root / ARTEFACTS, len(data))
    return True
