"""The gateway under load: POST /v1/jobs latency with N concurrent clients (issue 27's
"service overhead" target: p50 below 50 ms with 16 clients on CPU), and GET /v1/jobs/{id}
beside it. A real gateway (`python -m service`, uvicorn) on a real Redis and a local
storage folder; no worker, so jobs only queue (MAX_QUEUED is raised for the run).

    python benchmarks/load_bench.py --out benchmarks/results/cpu2core_load.json
    python benchmarks/load_bench.py --clients 16 --requests 20 --image-px 512

Each client sends `--requests` multipart jobs of two concepts (a reference and a mask
each: random-noise PNGs of --image-px, so they do not compress away), one after another
on its own connection; latency is from send to answer. Times are wall-clock on this
machine, shared with whatever else runs: read them as this machine's, not a GPU host's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.stack_procs import free_port  # noqa: E402


def _png(px: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (px, px, 3) if mode == "RGB" else (px, px)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def _form(px: int, seed: int) -> dict:
    files = [("images", (f"ref{i}.png", _png(px, seed + i), "image/png")) for i in range(2)]
    files += [("masks", (f"mask{i}.png", _png(px, seed + 10 + i, "L"), "image/png"))
              for i in range(2)]
    return {"data": {"prompt": "a man wearing a hat",
                     "concepts": json.dumps([{"word": "man"}, {"word": "hat"}]),
                     "params": json.dumps({"steps": 20, "width": 512, "height": 512})},
            "files": files}


def _start_gateway(redis_url: str, store: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": redis_url, "STORAGE_URL": f"file://{store}",
           "HOST": "127.0.0.1", "PORT": str(port), "MAX_QUEUED": "100000",
           "MAX_QUEUED_PER_KEY": "100000", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the gateway did not start: {log.read_text()[-2000:]}")


def _client(base: str, n: int, px: int, seed: int, posts: list, gets: list,
            errors: list, start: threading.Barrier) -> None:
    forms = [_form(px, seed * 1000 + i * 20) for i in range(n)]  # made before the clock
    with httpx.Client(base_url=base, timeout=60) as c:
        start.wait()
        for form in forms:
            t = time.perf_counter()
            r = c.post("/v1/jobs", **form)
            posts.append(time.perf_counter() - t)
            if r.status_code != 202:
                errors.append(f"POST {r.status_code}: {r.text[:200]}")
                continue
            t = time.perf_counter()
            g = c.get(f"/v1/jobs/{r.json()['id']}")
            gets.append(time.perf_counter() - t)
            if g.status_code != 200:
                errors.append(f"GET {g.status_code}")


def _summary(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    if not ms:
        return {}
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else [ms[0]] * 99
    return {"n": len(ms), "p50_ms": round(q[49], 1), "p90_ms": round(q[89], 1),
            "p99_ms": round(q[98], 1), "max_ms": round(ms[-1], 1)}


def run(clients: int, requests: int, px: int, redis_url: str) -> dict:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = _start_gateway(redis_url, Path(tmp) / "store", port, Path(tmp) / "gw.log")
        try:
            posts: list[float] = []
            gets: list[float] = []
            errors: list[str] = []
            start = threading.Barrier(clients + 1)
            threads = [threading.Thread(target=_client, args=(
                f"http://127.0.0.1:{port}", requests, px, i, posts, gets, errors, start))
                for i in range(clients)]
            for t in threads:
                t.start()
            start.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    redis.Redis.from_url(redis_url).flushdb()
    return {"clients": clients, "requests_per_client": requests, "image_px": px,
            "upload_bytes": sum(len(f[1][1]) for f in _form(px, 0)["files"]),
            "post": _summary(posts), "get": _summary(gets), "errors": errors[:5],
            "error_count": len(errors), "wall_s": round(wall, 2),
            "jobs_per_s": round(len(posts) / wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=20, help="jobs each client sends")
    p.add_argument("--image-px", type=int, nargs="+", default=[64, 512])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/9",
                   help="a Redis database the run may flush")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    runs = [run(c, args.requests, px, args.redis_url)
            for px in args.image_px for c in args.clients]
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "runs": runs}
    for r in runs:
        print(f"{r['clients']:>3} clients, {r['image_px']} px ({r['upload_bytes'] // 1024} "
              f"KiB/job): POST p50 {r['post'].get('p50_ms')} ms, p90 "
              f"{r['post'].get('p90_ms')} ms; GET p50 {r['get'].get('p50_ms')} ms; "
              f"{r['jobs_per_s']} jobs/s; errors {r['error_count']}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
