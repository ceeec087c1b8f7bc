"""How the fast loop runs a step: the UNet eager or compiled (falling back to eager only
when the compiler fails), and the whole step captured once as a CUDA graph and
replayed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CompiledUNet", "COMPILER_ERRORS", "run_step"]

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64


def _compiler_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:  # pragma: no cover - every supported torch has it
        pass
    try:
        from torch._inductor import exc as inductor

        errors += [getattr(inductor, n) for n in ("InductorError", "LoweringException",
                                                   "CppCompileError", "CUDACompileError")
                   if hasattr(inductor, n)]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


# What makes the compiled UNet fall back to eager. Not an out-of-memory error or any
# other runtime fault: those propagate and leave compilation on.
COMPILER_ERRORS = _compiler_errors()


class CompiledUNet:
    """The UNet as the fast loop calls it: eager, or `torch.compile`d after `enable`."""

    def __init__(self, unet):
        self.unet = unet
        self._compiled: Callable | None = None

    @property
    def is_compiled(self) -> bool:
        return self._compiled is not None

    def enable(self, mode: str = "default", options: dict | None = None) -> None:
        """Compile with inductor. The fast loop captures its own CUDA graph around the
        step, so modes and options with inductor's own cudagraphs are refused."""
        # Every call shape (size, concept count, batch of jobs, cached or not) is a
        # recompile (dynamic=False); past dynamo's limit (8 by default) new shapes
        # would silently run eager.
        import torch._dynamo.config as dynamo

        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        if options is not None:
            if options.get("triton.cudagraphs"):
                raise ValueError("the fast loop captures its own CUDA graphs: leave "
                                 "triton.cudagraphs off")
            self._compiled = torch.compile(self.unet, options=options, dynamic=False)
            return
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"mode {mode!r} adds inductor's own CUDA graphs; the fast "
                             "loop captures its own: use 'default' or "
                             "'max-autotune-no-cudagraphs'")
        self._compiled = torch.compile(self.unet, mode=mode, dynamic=False)

    def disable(self) -> None:
        self._compiled = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            return self.unet(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except COMPILER_ERRORS as e:
            log.warning("torch.compile failed (%s); falling back to eager", e)
            self.disable()
            return self.unet(*args, **kwargs)


def run_step(plan: Any, step: Callable[[], None], use_graphs: bool,
             variant: Any = None) -> dict:
    """Run `step` (a function of the plan's static buffers only), eagerly or by
    replaying the plan's CUDA graph of `variant` (a step with or without the semantic
    map), capturing it on first use. Returns the tensors that hold the riding
    references' K/V after the step (row -> (k, v) per layer).

    Capture order: a warm-up run on a side stream (allocator, kernel choices, compile)
    with the buffers the step writes saved and restored around it, then the capture
    into the plan's memory pool, then a replay.
    """
    if not use_graphs:
        step()
        return plan.captured_kv()
    if variant not in plan.graphs:
        writes = plan.buffers.written()
        saved = [b.clone() for b in writes]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        for buf, value in zip(writes, saved, strict=True):
            buf.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=plan.pool):
            step()
        plan.graphs[variant] = (graph, plan.captured_kv())
    graph, captured = plan.graphs[variant]
    graph.replay()
    return captured
