"""`magicface serve` (service.stack) as a user runs it: the page answers, a job sent with
curl finishes, Ctrl-C leaves no process behind; a child that dies takes the stack down
with its exit code; a Redis the stack starts itself goes with it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service.stack import free_port

from ..helpers.examples import EXAMPLES

ROOT = Path(__file__).resolve().parents[2]
MAGICFACE = Path(sys.executable).with_name("magicface")


class Serve:
    """`magicface serve ...` in a session of its own, as a terminal would hold it."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str]):
        self.port = free_port()
        self.out = (tmp / "serve.out").open("w+")
        self.proc = subprocess.Popen(
            [str(MAGICFACE), "serve", "--port", str(self.port), *args],
            cwd=tmp, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
            stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.output()):
                return m
            assert self.proc.poll() is None, f"serve exited early:\n{self.output()}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in:\n{self.output()}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def ctrl_c(self, timeout: float = 60) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # the terminal's foreground group
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.out.close()


def _gone(procs: list[psutil.Process], timeout: float = 5) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def _curl_job(url: str) -> dict:
    ex = EXAMPLES / "synthetic"
    spec = json.loads((ex / "example.json").read_text())
    concepts = json.dumps([{k: c[k] for k in ("word", "weight", "reference_prompt")}
                           for c in spec["concepts"]])
    cmd = ["curl", "-sS", "-X", "POST", f"{url}/v1/jobs", "-F", f"prompt={spec['prompt']}",
           "-F", f"concepts={concepts}",
           "-F", 'params={"steps": 4, "seed": 1, "width": 64, "height": 64}']
    for c in spec["concepts"]:
        cmd += ["-F", f"images=@{ex / c['image']}"]
    for c in spec["concepts"]:
        cmd += ["-F", f"masks=@{ex / c['mask']}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_serve_two_workers_runs_a_curl_job_and_ctrl_c_leaves_nothing(tmp_path, redis_server):
    serve = Serve(tmp_path, ["--workers", "2", "--storage-url", f"file://{tmp_path / 's'}"],
                  {"REDIS_URL": redis_server, "QUEUE_NAME": "stack-test"})
    try:
        serve.wait_for(r"web page: http://127\.0\.0\.1:\d+/")
        serve.wait_for(r"ready: 2 worker\(s\) warm")
        page = httpx.get(serve.url + "/")
        assert page.status_code == 200 and "<title>MagicFace</title>" in page.text
        assert httpx.get(serve.url + "/readyz").json()["workers"] == 2
        children = serve.descendants()
        assert len(children) == 3, children  # gateway and two workers
        job = _curl_job(serve.url)
        assert job["status"] == "queued", job
        deadline = time.monotonic() + 120
        while (view := httpx.get(f"{serve.url}/v1/jobs/{job['id']}").json())["status"] \
                not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert view["status"] == "succeeded", view
        png = httpx.get(serve.url + view["result"]["image_url"])
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        # Every process's output reaches the terminal under its name.
        out = serve.output()
        for name in ("gateway", "worker0", "worker1"):
            assert re.search(rf"^{name}\s*\| ", out, re.M), name
        assert serve.ctrl_c() == 0, serve.output()
        assert _gone(children) == [], serve.output()
        assert "stopping" in serve.output()
    finally:
        serve.close()


@pytest.mark.slow
def test_a_dying_worker_stops_the_stack_with_its_code_and_its_own_redis(tmp_path):
    serve = Serve(tmp_path, ["--workers", "1", "--own-redis",
                             "--storage-url", f"file://{tmp_path / 's'}"], {})
    try:
        serve.wait_for(r"redis: redis://127\.0\.0\.1:\d+/0 \(started for this stack\)")
        serve.wait_for(r"ready: 1 worker\(s\) warm")
        children = serve.descendants()
        names = sorted(p.name() for p in children)
        assert any("redis" in n for n in names), names
        worker = next(p for p in children if "worker" in " ".join(p.cmdline()))
        worker.send_signal(signal.SIGKILL)
        assert serve.proc.wait(timeout=60) == 128 + signal.SIGKILL, serve.output()
        assert "worker0 exited with code -9" in serve.output()
        assert _gone(children) == [], [p.cmdline() for p in _gone(children)]
    finally:
        serve.close()


def test_serve_without_workers_stops_on_sigterm_with_nothing_left(tmp_path, redis_server):
    """The fast path of the same contract: the gateway alone, SIGTERM, exit 0."""
    serve = Serve(tmp_path, ["--workers", "0", "--storage-url", f"file://{tmp_path / 's'}"],
                  {"REDIS_URL": redis_server})
    try:
        serve.wait_for(r"web page: ", timeout=60)
        children = serve.descendants()
        assert len(children) == 1
        assert httpx.get(serve.url + "/healthz").json()["status"] == "ok"
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=30) == 0, serve.output()
        assert _gone(children) == []
    finally:
        serve.close()
