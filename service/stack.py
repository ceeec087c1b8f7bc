"""Everything on one machine: a Redis, the gateway and N workers, as child processes.

    python -m service.stack --workers 2          (or `magicface serve`, `magicface-serve`)

Redis is REDIS_URL's when set, else the machine's on 127.0.0.1:6379 when it answers, else
a `redis-server` of the stack's own on a free loopback port (no persistence; stopped
with the stack). The gateway and workers get the stack's environment plus the Redis URL
and HOST/PORT. Their output is streamed with a name prefix (and kept in --log-dir). Ctrl-C
or SIGTERM stops everything, workers first; when one child dies the others are stopped
and the stack exits with that child's code. On Linux each child also gets SIGKILL should
the stack itself die (PR_SET_PDEATHSIG), so nothing is left behind either way.

`Stack` is the same thing as a class: `scripts/demo.sh`, the benchmarks and the tests'
real-stack fixtures start their processes through it. It never imports torch (the
workers do, in their own processes).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import httpx

# The processes beneath the stack are stack_procs'; its public names stay importable here.
from .stack_procs import (
    Child,
    StackError,
    find_redis,
    free_port,
    preexec_die_with_parent,
    redis_answers,
    start_redis,
)

__all__ = ["Stack", "StackError", "free_port", "find_redis", "start_redis", "main"]

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


class Stack:
    """A gateway and workers (and, when needed, a Redis) as child processes.

    `env` is added to this process's environment for every child. `log_dir` keeps each
    child's output in `<name>.log`; `echo` also prints it here, prefixed by the name.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, log_dir: Path | None = None,
                 echo: bool = False, host: str = "127.0.0.1", port: int | None = None,
                 cwd: Path | None = None):
        self.host, self.port = host, port or free_port(host)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),
                    "HOST": host, "PORT": str(self.port)}
        self.log_dir, self.echo, self.cwd = log_dir, echo, cwd
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_proc: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._children: list[Child] = []
        self._print_lock = threading.Lock()
        self.base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"
        self.client = httpx.Client(base_url=self.base_url, timeout=30)

    # -- starting ------------------------------------------------------------------------
    def ensure_redis(self, own: bool = False) -> str:
        """REDIS_URL's server, the machine's default one, or (also whenever `own`) one
        started for the stack."""
        given = None if own else self.env.get("REDIS_URL")
        if own:
            url, self.redis_proc = start_redis()
        elif given:
            if not redis_answers(given):
                raise StackError(f"REDIS_URL {given} does not answer")
            url = given
        elif redis_answers(DEFAULT_REDIS):
            url = DEFAULT_REDIS
        else:
            url, self.redis_proc = start_redis()
        self.env["REDIS_URL"] = url
        return url

    def _spawn(self, name: str, module: str) -> subprocess.Popen:
        # Each child in a process group of its own: a terminal's Ctrl-C reaches only the
        # stack, which then stops each child once, in order (RQ takes a second signal
        # as a cold shutdown, which would abandon a running job).
        cmd = [sys.executable, "-m", module]
        log: IO[bytes] | None = None
        if self.log_dir is not None:
            log = (self.log_dir / f"{name}.log").open("ab")
        if not self.echo:
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env,
                                    preexec_fn=preexec_die_with_parent(),
                                    start_new_session=True, stdout=log or subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT)
            if log is not None:
                log.close()  # the child holds its own descriptor
            self._children.append(Child(name, proc, None))
            return proc
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env,
                                preexec_fn=preexec_die_with_parent(),
                                start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        reader = threading.Thread(target=self._relay, args=(name, proc.stdout, log),
                                  daemon=True, name=f"log-{name}")
        reader.start()
        self._children.append(Child(name, proc, reader))
        return proc

    def _relay(self, name: str, stream: IO[bytes], log: IO[bytes] | None) -> None:
        width = 9
        for line in iter(stream.readline, b""):
            if log is not None:
                log.write(line)
                log.flush()
            text = line.decode(errors="replace").rstrip("\n")
            with self._print_lock:
                print(f"{name:<{width}}| {text}", flush=True)
        if log is not None:
            log.close()

    def start_gateway(self, timeout: float = 60) -> subprocess.Popen:
        self.gateway = self._spawn("gateway", "service")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return self.gateway
            except httpx.HTTPError:
                pass
            if self.gateway.poll() is not None:
                raise StackError(f"the gateway exited with code {self.gateway.returncode}"
                                 f"{self._tail('gateway')}")
            time.sleep(0.2)
        raise StackError(f"the gateway did not answer /healthz within {timeout:.0f} s")

    def start_worker(self, wait: bool = True, timeout: float = 120) -> subprocess.Popen:
        proc = self._spawn(f"worker{len(self.workers)}", "worker")
        self.workers.append(proc)
        if wait:
            self.wait_ready(timeout)
        return proc

    def ready(self, workers: int = 1) -> bool:
        """/readyz counts at least `workers` warm workers."""
        try:
            r = self.client.get("/readyz")
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("workers", 0) >= workers

    def wait_ready(self, timeout: float = 120, workers: int = 1) -> None:
        """Until /readyz counts `workers` warm workers; a worker that exits first raises."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready(workers):
                return
            for i, w in enumerate(self.workers):
                if w.poll() is not None:
                    raise StackError(f"worker{i} exited with code {w.returncode}"
                                     f"{self._tail(f'worker{i}')}")
            time.sleep(0.3)
        raise StackError(f"{workers} worker(s) did not become ready within {timeout:.0f} s")

    # -- running and stopping ------------------------------------------------------------
    def first_exit(self) -> tuple[str, int] | None:
        """The first child (by start order) that has exited, with its code."""
        for child in self._children:
            code = child.proc.poll()
            if code is not None:
                return child.name, code
        return None

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log" if self.log_dir else None
        return path.read_text(errors="replace")[-3000:] if path and path.exists() else ""

    def _tail(self, name: str) -> str:
        text = self.log(name)
        return f":\n{text}" if text else ""

    def stop(self, timeout: float = 15) -> None:
        """Workers first (they finish or hand back their job), then the gateway, then a
        Redis of our own; SIGTERM, and SIGKILL for whatever outlives `timeout`."""
        self.client.close()
        order = [c for c in self._children if c.proc is not self.gateway]
        order += [c for c in self._children if c.proc is self.gateway]
        for child in order:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + timeout
        for child in order:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            if child.reader is not None:
                child.reader.join(timeout=2)
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m service.stack",
        description="Run Redis (if none answers), the gateway and workers on this machine "
                    "until Ctrl-C. Other settings come from the environment, as for the "
                    "gateway and the worker (see the README's configuration table).")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")),
                   help="the gateway's port (default 8000; 0 picks a free one)")
    p.add_argument("--model", default=os.environ.get("MAGICFACE_MODEL", "tiny"),
                   help="MAGICFACE_MODEL for the workers (default: tiny random weights)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or None,
                   help="the Redis to use (default: REDIS_URL, else 127.0.0.1:6379 when it "
                        "answers, else a redis-server started for the stack)")
    p.add_argument("--own-redis", action="store_true",
                   help="always start a redis-server for the stack (on a free loopback "
                        "port, no persistence), even when another answers")
    p.add_argument("--storage-url", default=os.environ.get("STORAGE_URL", "file://./data"))
    p.add_argument("--log-dir", type=Path, default=None,
                   help="also keep each process's output in DIR/<name>.log")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {"MAGICFACE_MODEL": args.model, "STORAGE_URL": args.storage_url}
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    stack = Stack(env, log_dir=args.log_dir, echo=True, host=args.host,
                  port=args.port or None)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    code = 0
    try:
        url = stack.ensure_redis(own=args.own_redis)
        print(f"stack    | redis: {url}{' (started for this stack)' if stack.redis_proc else ''}",
              flush=True)
        stack.start_gateway()
        for _ in range(args.workers):
            stack.start_worker(wait=False)
        print(f"stack    | web page: {stack.base_url}/   API: {stack.base_url}/v1/jobs   "
              f"docs: {stack.base_url}/docs   ({args.workers} worker(s) warming; "
              "Ctrl-C stops everything)", flush=True)
        announced = args.workers == 0
        while True:
            if not announced and stack.ready(args.workers):
                announced = True
                print(f"stack    | ready: {args.workers} worker(s) warm", flush=True)
            ended = stack.first_exit()
            if ended is not None:
                name, code = ended
                print(f"stack    | {name} exited with code {code}: stopping the stack",
                      flush=True)
                code = code if code >= 0 else 128 - code  # killed by a signal: 128 + N
                break
            time.sleep(0.2)
    except _Stop:
        print("stack    | stopping", flush=True)
    except StackError as e:
        print(f"stack    | {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
