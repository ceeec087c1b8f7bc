"""The processes beneath the local stack (`service.stack`): children that die with it, on
free loopback ports, and a Redis, found answering or started for the stack. Like the
stack, it never imports torch."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import redis

__all__ = ["StackError", "Child", "free_port", "redis_answers", "find_redis", "start_redis",
           "preexec_die_with_parent"]

_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A process of the stack could not be started or did not become ready."""


class Child:
    """One process of the stack and where its output goes."""

    def __init__(self, name: str, proc: subprocess.Popen, reader: threading.Thread | None):
        self.name, self.proc, self.reader = name, proc, reader


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
        return True
    except (redis.RedisError, ValueError):
        return False


def find_redis(candidates: Iterable[str | None]) -> str | None:
    """The first of `candidates` whose Redis answers a PING."""
    return next((url for url in candidates if url and redis_answers(url)), None)


def preexec_die_with_parent() -> Callable[[], None] | None:
    """Between fork and exec, ask Linux to SIGKILL the child when the stack dies. prctl
    is looked up here, in the parent: the child only calls it (no imports or dlopen
    after a fork from a threaded process)."""
    if not sys.platform.startswith("linux"):
        return None  # Ctrl-C and SIGTERM still stop the children
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))

    return die_with_parent


def start_redis(db: int = 0, directory: Path | None = None,
                port: int | None = None) -> tuple[str, subprocess.Popen]:
    """A `redis-server` of our own on a free loopback port, without persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise StackError("no Redis answers and redis-server is not installed "
                         "(Debian: apt-get install redis-server; or set REDIS_URL)")
    port = port or free_port()
    workdir = directory or Path(tempfile.mkdtemp(prefix="magicface-redis-"))
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=preexec_die_with_parent(), start_new_session=True)
    url = f"redis://127.0.0.1:{port}/{db}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_answers(url):
            return url, proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise StackError(f"redis-server did not start on port {port}")
