"""Cold start: WARMUP_SHAPES parsed and run before the worker is ready (the plans a
request of those shapes needs exist beforehand), /readyz counting only warm workers,
and the compile cache saved and loaded across starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service import jobs
from service.settings import Settings
from service.validation import Params
from worker.__main__ import load_pipeline, warm
from worker.warmup import Shape, parse_shapes, plans_needed, synthetic_request
from worker.worker import MagicFaceWorker

from ..helpers.stack import Stack

ROOT = Path(__file__).resolve().parents[2]


def test_warmup_shapes_are_parsed():
    assert parse_shapes("") == []
    assert parse_shapes("512x512:1,2,3; 768x512:1") == [
        Shape(512, 512, 1), Shape(512, 512, 2), Shape(512, 512, 3), Shape(768, 512, 1)]
    assert parse_shapes("64x64:0,0") == [Shape(64, 64, 0)]
    for bad, why in [("512:1", "WIDTHxHEIGHT"), ("512x500:1", "multiples of 8"),
                     ("512x512:9", "concept counts"), ("512x512", "WIDTHxHEIGHT")]:
        with pytest.raises(ValueError, match=f"WARMUP_SHAPES.*{why}"):
            parse_shapes(bad)


def test_warming_makes_the_plans_requests_of_those_shapes_use():
    settings = Settings(magicface_model="tiny", device="cpu", warmup_shapes="128x128:1,2",
                        warmup_steps=2, batch_max=3, reference_seed=0)
    pipe = load_pipeline(settings)
    assert pipe.fast_sampler.max_plans >= plans_needed(parse_shapes("128x128:1,2"), 3)
    took = warm(pipe, settings, None)
    assert took > 0
    plans = dict(pipe.fast_sampler.plans)
    # 2 concept counts x (alone, 3 together) x (riding, cached).
    assert len(plans) == 8
    assert sorted({p.layout.jobs for p in plans}) == [1, 3]
    assert len(pipe.kv_cache) == 0  # the synthetic references are not kept
    # A request of a warmed shape (the service's defaults, other steps and seed) finds
    # its plan made: alone, then again from the cache, then three together.
    config = Params(width=128, height=128, steps=4, seed=9).to_config(reference_seed=0)
    request = synthetic_request(Shape(128, 128, 2), config, seed=9)
    pipe.generate(request.prompt, request.concepts, config)
    pipe.generate(request.prompt, request.concepts, config)
    pipe.generate_batch([synthetic_request(Shape(128, 128, 1), config, seed=s)
                         for s in range(3)])
    assert set(pipe.fast_sampler.plans) == set(plans)


def test_a_warming_worker_is_registered_but_not_ready(redis_db):
    settings = Settings(worker_heartbeat_ttl_s=10)
    worker = MagicFaceWorker([], settings=settings, connection=redis_db, model="tiny")
    worker.start_announcing(warm=False)
    try:
        deadline = time.monotonic() + 5
        while not jobs.live_workers(redis_db, settings.queue_name, warm=False):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert jobs.live_workers(redis_db, settings.queue_name) == []
        worker.mark_warm(12.5)
        (ready,) = jobs.live_workers(redis_db, settings.queue_name)
        assert ready["warm"] is True and ready["ready_s"] == 12.5
        assert jobs.live_workers(redis_db, settings.queue_name, warm=False) == []
    finally:
        worker._alive_stop.set()
        worker._alive.join(timeout=5)


@pytest.mark.slow
def test_readyz_waits_for_the_warm_up(redis_db, redis_server, tmp_path):
    # Enough shapes that warming takes a while on this CPU.
    stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 's'}",
                   "WARMUP_SHAPES": "256x256:0,1,2,3", "WARMUP_STEPS": "6",
                   "BATCH_MAX": "3", "REFERENCE_SEED": "0"}, tmp_path / "logs")
    stack.start_gateway()
    try:
        stack.start_worker(wait=False)
        codes = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = stack.client.get("/readyz")
            codes.append(r.json().get("error", {}).get("code", "ready")
                         if r.status_code == 503 else "ready")
            if r.status_code == 200:
                assert r.json()["warming"] == 0
                break
            time.sleep(0.1)
        assert codes[-1] == "ready", stack.log("worker0")
        assert "warming_up" in codes, codes
        assert codes.index("warming_up") < codes.index("ready")
        (info,) = jobs.live_workers(redis_db, "magicface")
        assert info["ready_s"] > 0
        assert "worker ready in" in stack.log("worker0")
    finally:
        stack.stop()


COMPILE = """
import sys, torch
from worker.warmup import open_compile_cache, save_compile_cache
loaded = open_compile_cache(sys.argv[1])
f = torch.compile(lambda x: torch.sin(x) * 2 + x.cos(), dynamic=False)
f(torch.randn(8, 8))
print("loaded" if loaded else "cold", save_compile_cache(sys.argv[1]))
"""


@pytest.mark.slow
def test_compile_cache_is_saved_and_loaded_across_starts(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}

    def start() -> str:
        out = subprocess.run([sys.executable, "-c", COMPILE, str(tmp_path / "cache")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-2]

    assert start() == "cold"
    assert (tmp_path / "cache" / "torch_cache_artifacts.bin").stat().st_size > 0
    assert (tmp_path / "cache" / "inductor").is_dir()  # inductor's own cache went there
    assert start() == "loaded"
    # A damaged file is ignored (a warning), not a failed start.
    (tmp_path / "cache" / "torch_cache_artifacts.bin").write_bytes(b"not a cache")
    assert start() == "cold"


def test_settings_refuse_a_bad_batch_size():
    with pytest.raises(ValueError):
        Settings(batch_max=0)
    assert json.loads(Settings().model_dump_json())["batch_wait_ms"] == 0
