"""MagicFaceWorker: an RQ SimpleWorker (no fork: CUDA must not be forked) that keeps
its job's registry entry alive with short heartbeats, so a killed worker's job is
found abandoned and failed (`worker_lost`) seconds later instead of after the job
timeout."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.worker import WorkerStatus

from service.keys import WORKER_ALIVE_KEY
from service.settings import Settings

log = logging.getLogger("magicface.worker")


class MagicFaceWorker(SimpleWorker):
    def __init__(self, queues, *, settings: Settings, connection: Redis, model: str, **kwargs):
        self.settings = settings
        self.model = model
        hb = settings.worker_heartbeat_ttl_s
        super().__init__(
            queues, connection=connection,
            name=settings.worker_name or f"magicface-{socket.gethostname()}-{os.getpid()}",
            # A short worker TTL bounds the blocking dequeue, so maintenance (which
            # fails abandoned jobs) runs every few seconds even when idle.
            worker_ttl=max(20, 2 * hb), maintenance_interval=settings.worker_maintenance_interval_s,
            job_monitoring_interval=max(1, hb // 3), **kwargs)
        self._alive_stop = threading.Event()
        self._alive = threading.Thread(target=self._announce, daemon=True)

    # Registration for /readyz: a short-lived key per worker with its model.
    def _announce(self) -> None:
        key = WORKER_ALIVE_KEY.format(self.name)
        ttl = self.settings.worker_heartbeat_ttl_s
        info = json.dumps({"name": self.name, "model": self.model, "model_loaded": True,
                           "pid": os.getpid(), "since": time.time()})
        while True:
            try:
                self.connection.set(key, info, ex=ttl)
            except Exception as e:  # noqa: BLE001 - Redis may come back
                log.warning("worker announce failed: %s", e)
            if self._alive_stop.wait(max(1.0, ttl / 3)):
                break
        try:
            self.connection.delete(key)
        except Exception:  # noqa: BLE001
            pass

    def work(self, *args, **kwargs):
        self._alive.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            self._alive_stop.set()
            self._alive.join(timeout=5)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.settings.worker_heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(max(1.0, self.settings.worker_heartbeat_ttl_s / 3)):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as e:  # noqa: BLE001 - the next beat may succeed
                    log.warning("heartbeat for job %s failed: %s", job.id, e)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)
