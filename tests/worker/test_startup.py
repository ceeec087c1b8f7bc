"""What a worker refuses at start (no model named outside demo mode; REQUIRE_GPU on a
machine without a GPU), and its container healthcheck, which follows the heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.settings import Settings
from worker.__main__ import check_startup

from ..helpers.stack import Stack

ROOT = Path(__file__).resolve().parents[2]


def run_worker(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MAGICFACE_MODEL", "MAGICFACE_DEMO", "REQUIRE_GPU")}
    return subprocess.run([sys.executable, "-m", "worker"], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_no_model_outside_demo_mode_refuses_to_start():
    with pytest.raises(SystemExit, match="MAGICFACE_MODEL is not set.*MAGICFACE_DEMO=true"):
        check_startup(Settings())
    assert check_startup(Settings(magicface_demo=True)) == "tiny"
    assert check_startup(Settings(magicface_model="/models/sd15")) == "/models/sd15"
    proc = run_worker({"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 1 and "MAGICFACE_MODEL is not set" in proc.stderr


def test_require_gpu_on_a_cpu_machine_refuses_to_start():
    import torch

    if torch.cuda.is_available():  # the check below is about machines without one
        settings = Settings(magicface_model="tiny", require_gpu=True, device="cpu")
    else:
        settings = Settings(magicface_model="tiny", require_gpu=True)
    with pytest.raises(SystemExit, match="REQUIRE_GPU=true but no usable CUDA GPU"):
        check_startup(settings)
    proc = run_worker({"MAGICFACE_MODEL": "tiny", "REQUIRE_GPU": "true", "DEVICE": "cpu",
                       "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 1 and "REQUIRE_GPU=true" in proc.stderr


def healthcheck(env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, "-m", "worker.healthcheck"], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True).returncode


def test_healthcheck_reads_the_heartbeat_file(tmp_path):
    beat = tmp_path / "beat"
    env = {"HEARTBEAT_FILE": str(beat), "WORKER_HEARTBEAT_TTL_S": "10"}
    assert healthcheck(env) == 1  # no file: never started
    beat.touch()
    assert healthcheck(env) == 0
    old = time.time() - 30
    os.utime(beat, (old, old))
    assert healthcheck(env) == 1


@pytest.mark.slow
def test_healthcheck_fails_when_a_real_workers_heartbeat_stops(redis_db, redis_server,
                                                                 tmp_path):
    beat = tmp_path / "beat"
    stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 's'}",
                   "HEARTBEAT_FILE": str(beat)}, tmp_path / "logs")
    stack.start_gateway()
    try:
        worker = stack.start_worker()
        env = {"HEARTBEAT_FILE": str(beat), "WORKER_HEARTBEAT_TTL_S": "4"}
        assert healthcheck(env) == 0
        worker.send_signal(signal.SIGSTOP)  # a hung process: alive, but no heartbeat
        try:
            deadline = time.monotonic() + 20
            while healthcheck(env) == 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert healthcheck(env) == 1
        finally:
            worker.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        while healthcheck(env) == 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert healthcheck(env) == 0  # and it recovers with the worker
    finally:
        stack.stop()
