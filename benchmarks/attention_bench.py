"""The cond row's RSA/RBA attention alone, at SD1.5's modified-layer shapes: the dense
(Lq x Lk) SDPA mask against the folded bias (extra head dims, mask-free SDPA), with
plain self-attention as the floor. Per call: the per-step bias work (the gather from
the table) and the attention.

    python benchmarks/attention_bench.py --out results/attn.json     # GPU: fp16
    python benchmarks/attention_bench.py --cpu --repeats 2          # CPU: fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magicface_core.attention import (  # noqa: E402
    attend,
    attend_folded,
    folded_key_columns,
    folded_query_table,
    rba_table,
)

# (grid side, heads, head dim) of SD1.5's modified layers at 512x512.
LEVELS = {"64x64": (64, 8, 40), "32x32": (32, 8, 80)}


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# One step's work for each form; the per-step gathers (bias rows, query columns) count.
def dense_step(q, k, v, rk, rv, table, groups):
    return attend(q, k, v, rk, rv, table[groups])


def folded_step(q, k, v, rk, rv, qtable, groups, cols):
    return attend_folded(q, k, v, rk, rv, qtable[groups], cols)


def repeated(fn, inner: int, *args):
    """`fn(*args)` called `inner` times: one timed unit."""
    def run():
        for _ in range(inner):
            fn(*args)
    return run


def int_list(text: str) -> list[int]:
    """A comma list of integers ('' is none); the benchmarks' list options."""
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    p.add_argument("--concepts", type=int_list, default="1,2,3")
    p.add_argument("--fold-multiples", type=int_list, default="8",
                   help="folded head dim padded (zero columns) to a multiple of each of "
                        "these (comma list); 8 is the library's; others are named "
                        "'folded/mM'")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "dtype": str(dtype), "cases": {}}
    for level, (side, heads, d) in LEVELS.items():
        length = side * side

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        q, k, v = rand(1, heads, length, d), rand(1, heads, length, d), rand(1, heads, length, d)
        plain_t = timed(repeated(F.scaled_dot_product_attention, args.inner, q, k, v), device,
                        args.repeats)
        result["cases"][f"{level} plain self-attention"] = plain_t / args.inner * 1e3
        for n in args.concepts:
            rk = [rand(1, heads, length, d) for _ in range(n)]
            rv = [rand(1, heads, length, d) for _ in range(n)]
            masks = [(torch.rand(length, generator=g) < 0.3).to(device) for _ in range(n)]
            weights = [3.0] * n
            groups = torch.randint(0, n + 1, (length,), generator=g).to(device)
            table = rba_table(length, masks, weights, dtype=dtype, device=device)
            cols = folded_key_columns(length, masks, weights, head_dim=d, dtype=dtype,
                                      device=device)
            qtable = folded_query_table(n, head_dim=d, dtype=dtype, device=device)
            dense = repeated(dense_step, args.inner, q, k, v, rk, rv, table, groups)
            forms = [("dense", dense)]
            for m in args.fold_multiples:
                # Zero columns in both tables change no logit, only the kernel's width.
                extra = -(d + qtable.shape[-1]) % m
                qt, kc = F.pad(qtable, (0, extra)), F.pad(cols, (0, extra))
                name = "folded" if m == 8 else f"folded/m{m}"
                forms.append((name, repeated(folded_step, args.inner, q, k, v, rk, rv, qt,
                                             groups, kc)))
                if m == 8:
                    a = dense_step(q, k, v, rk, rv, table, groups).float()
                    b = folded_step(q, k, v, rk, rv, qt, groups, kc).float()
                    result["cases"][f"{level} N={n} folded_vs_dense_rel_err"] = float(
                        (a - b).norm() / a.norm())
            for name, fn in forms:
                ms = timed(fn, device, args.repeats) / args.inner * 1e3
                result["cases"][f"{level} N={n} {name}"] = ms
    for name, value in result["cases"].items():
        unit = "" if name.endswith("err") else " ms"
        print(f"{name:<40} {value:10.4g}{unit}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
