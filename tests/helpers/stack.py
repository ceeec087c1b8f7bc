"""Real processes for end-to-end tests: the product's local stack (Redis, the gateway,
workers) with test defaults, and a Redis and a moto S3 server that can be stopped and
started again (outages)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from service import stack
from service.stack import find_redis, free_port, start_redis

from .multipart import job_form

ROOT = Path(__file__).resolve().parents[2]


def redis_url(db: int = 15) -> tuple[str, subprocess.Popen | None]:
    """MAGICFACE_TEST_REDIS_URL's server, the machine's on 6379, or a redis-server we
    start (tests use database 15 and flush it)."""
    url = find_redis([os.environ.get("MAGICFACE_TEST_REDIS_URL"),
                      f"redis://127.0.0.1:6379/{db}"])
    if url is not None:
        return url, None
    return start_redis(db)


class Stack(stack.Stack):
    """The product's local stack (`service.stack`), configured for tests: short worker
    heartbeats, the tiny model, logs kept in `logs`, plus HTTP helpers."""

    def __init__(self, env: dict[str, str], logs: Path):
        super().__init__({"MAGICFACE_MODEL": "tiny", "HF_HUB_OFFLINE": "1",
                          "WORKER_HEARTBEAT_TTL_S": "4",
                          "WORKER_MAINTENANCE_INTERVAL_S": "2", **env},
                         log_dir=logs, cwd=ROOT)
        self.logs = logs

    def kill_worker(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    # -- client helpers -----------------------------------------------------------------
    def submit(self, prompt, concepts, images, masks=(), params=None, headers=None,
               data_extra=None):
        form = job_form(prompt, concepts, images, masks, params)
        form["data"].update(data_extra or {})
        return self.client.post("/v1/jobs", **form, headers=headers or {})

    def submit_job(self, job: dict, params=None, headers=None) -> dict:
        """Submit a job spec (prompt, concepts, images, masks); the accepted job's view."""
        r = self.submit(job["prompt"], job["concepts"], job["images"], job["masks"], params,
                        headers)
        assert r.status_code == 202, r.text
        return r.json()

    def wait(self, job_id: str, statuses=("succeeded", "failed", "canceled"),
             timeout: float = 120, min_step: int | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.client.get(f"/v1/jobs/{job_id}").json()
            if view["status"] in statuses and (min_step is None
                                               or view["progress"]["step"] >= min_step):
                return view
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach {statuses}: {view}")


class OwnRedis:
    """A redis-server of a test's own, with an append-only file, that can be stopped
    (state saved) and started again on the same port: an outage or a restart."""

    def __init__(self, directory: Path):
        self.dir, self.port = directory, free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                redis.Redis.from_url(self.url).shutdown(save=True)
            except redis.RedisError:
                pass  # shutdown closes the connection under the client
            self.proc.wait(timeout=10)
        self.proc = None


class OwnS3:
    """A moto S3 server of a test's own that can be stopped and started again on the
    same port with its objects kept (moto keeps them in this process)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        for _ in range(50):
            try:
                self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                                 verbose=False)
                self.server.start()
                return
            except OSError:  # the port may still be closing
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
