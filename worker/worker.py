"""MagicFaceWorker: an RQ SimpleWorker (no fork: CUDA must not be forked) that

- keeps its job's registry entry alive with short heartbeats, and while busy also runs
  the registry maintenance RQ only runs between jobs, so a dead worker's job is failed
  (`worker_lost`) within about WORKER_HEARTBEAT_TTL_S + WORKER_MAINTENANCE_INTERVAL_S
  even when every other worker is busy;
- rides out a Redis outage (restart, failover): its own Redis bookkeeping (heartbeat,
  state, maintenance, recording a job's end) is retried with backoff for up to
  REDIS_RETRY_S instead of ending the worker."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from service import jobs, keys, records, workers
from service.masks import MASK_TASK
from service.queueing import JobSerializer, SafeJob, fetch_jobs
from service.reaper import reap, settled
from service.settings import Settings
from service.storage import Storage

from . import masks, tasks
from .claims import BATCH_SCAN, claim
from .retry import REDIS_DOWN, retry
from .sweeper import sweep_if_due

log = logging.getLogger("magicface.worker")


class MagicFaceJob(SafeJob):
    """A job whose function is this worker's `tasks.generate`. The name is matched, never
    imported: a job naming any other function is refused (it fails) rather than run.
    Release 0.1's wheel queued it as `magicface_server.worker.tasks.generate`; that
    name still maps to the task."""

    # A job sampled in a batch carries its outcome here (set by the worker that sampled
    # it) for RQ's call of the function to hand back: a value on the job, not a global.
    outcome: tasks.Outcome | None = None

    @property
    def func(self):
        name = self.func_name  # DeserializationError for a record that is not JSON
        if name == MASK_TASK:
            return masks.propose
        if not (name == jobs.TASK or (name or "").endswith("." + jobs.TASK)):
            raise ValueError(f"{name!r} is not this worker's task ({jobs.TASK} or "
                             f"{MASK_TASK})")
        if self.outcome is not None:
            done = self.outcome
            return lambda *args, **kwargs: done.get()
        return tasks.generate


class MagicFaceWorker(SimpleWorker):
    job_class = MagicFaceJob

    def __init__(self, queues, *, settings: Settings, connection: Redis, model: str,
                 storage: Storage | None = None, **kwargs):
        self.settings = settings
        self.signaled = False  # a stop signal arrived (see request_stop)
        self.model = model
        self.storage = storage  # swept for expired jobs' objects when given
        hb = settings.worker_heartbeat_ttl_s
        super().__init__(
            queues, connection=connection,
            name=settings.worker_name or f"magicface-{socket.gethostname()}-{os.getpid()}",
            # A short worker TTL bounds the blocking dequeue, so maintenance (which
            # fails abandoned jobs) runs every few seconds even when idle.
            worker_ttl=max(20, 2 * hb), maintenance_interval=settings.worker_maintenance_interval_s,
            job_monitoring_interval=max(1, hb // 3), serializer=JobSerializer, **kwargs)
        self._alive_stop = threading.Event()
        self._alive = threading.Thread(target=self._announce, daemon=True)
        self._since = time.time()
        # Ready for /readyz once warm (WARMUP_SHAPES compiled); `ready_s`: seconds
        # from the process start to ready.
        self.warm = True
        self.ready_s: float | None = None

    def start_announcing(self, warm: bool = True) -> None:
        """Register this worker (before `work`: a warming worker shows as such)."""
        self.warm = warm
        if not self._alive.is_alive():
            self._alive.start()

    def mark_warm(self, ready_s: float) -> None:
        self.warm, self.ready_s = True, round(ready_s, 2)
        try:
            self._register()
        except REDIS_DOWN as e:  # the announce loop registers it once Redis is back
            log.warning("worker registration failed: %s", e)

    def _register(self) -> None:
        info = {"name": self.name, "model": self.model, "model_loaded": True,
                "masks": self.settings.proposes_masks,
                "warm": self.warm, "ready_s": self.ready_s, "pid": os.getpid(),
                "since": self._since}
        workers.register(self.connection, self.settings.queue_name, self.name, info,
                         self.settings.worker_heartbeat_ttl_s)

    # Registration for /readyz: a short-lived key per worker with its model.
    def _announce(self) -> None:
        ttl = self.settings.worker_heartbeat_ttl_s
        last_sweep = 0.0
        while True:
            try:
                self._register()
                # The container's healthcheck reads this file's age: it stays fresh
                # while the worker can reach Redis and its loop is alive.
                Path(self.settings.heartbeat_file).touch()
            except Exception as e:  # noqa: BLE001 - Redis may come back
                log.warning("worker announce failed: %s", e)
            try:
                for queue in self._job_queues():
                    jobs.expire(self.connection, queue, self.settings.result_ttl_s)
            except Exception as e:  # noqa: BLE001 - the next round may succeed
                log.warning("deadline check failed: %s", e)
            if (self.storage is not None
                    and time.monotonic() - last_sweep >= self.settings.sweep_interval_s):
                last_sweep = time.monotonic()
                try:
                    sweep_if_due(self.storage, self.connection, self.settings.orphan_grace_s,
                                 self.settings.sweep_interval_s)
                except Exception as e:  # noqa: BLE001 - the next sweep may succeed
                    log.warning("sweep failed: %s", e)
            if self._alive_stop.wait(max(1.0, min(ttl / 3, self.settings.sweep_interval_s))):
                break
        try:
            workers.unregister(self.connection, self.settings.queue_name, self.name)
        except Exception:  # noqa: BLE001
            pass

    # -- Redis outages -----------------------------------------------------------------
    def _through_outage(self, what: str, fn, *args, **kwargs):
        return retry(lambda: fn(*args, **kwargs), errors=REDIS_DOWN,
                     within_s=self.settings.redis_retry_s, what=f"worker {what}",
                     give_up=lambda: self.stop_requested)

    @property
    def stop_requested(self) -> bool:
        """A stop signal arrived (RQ's handler, `request_stop`, is where we note it)."""
        return self.signaled

    def request_stop(self, signum, frame):
        self.signaled = True
        return super().request_stop(signum, frame)

    def heartbeat(self, *args, **kwargs):
        return self._through_outage("heartbeat", super().heartbeat, *args, **kwargs)

    def set_state(self, *args, **kwargs):
        return self._through_outage("state", super().set_state, *args, **kwargs)

    def check_for_suspension(self, *args, **kwargs):
        return self._through_outage("suspension check", super().check_for_suspension,
                                    *args, **kwargs)

    def run_maintenance_tasks(self, *args, **kwargs):
        return self._through_outage("maintenance", super().run_maintenance_tasks, *args,
                                    **kwargs)

    # RQ records a job's end in these public hooks (its end time, then success, or
    # failure with its traceback); a Redis outage at that moment must delay the record,
    # not lose the worker. Once recorded, the job's terminal event goes out (the view
    # then shows the final state).
    def handle_execution_ended(self, *args, **kwargs):
        return self._through_outage("job end time", super().handle_execution_ended, *args,
                                    **kwargs)

    def handle_job_success(self, job: Job, queue: Queue, *args, **kwargs):
        self._through_outage("job success record", super().handle_job_success, job, queue,
                             *args, **kwargs)
        self._ended(job, queue)

    def handle_job_failure(self, job: Job, queue: Queue, *args, **kwargs):
        self._through_outage("job failure record", super().handle_job_failure, job, queue,
                             *args, **kwargs)
        self._ended(job, queue)

    def _ended(self, job: Job, queue: Queue) -> None:
        if _is_proposal(job):  # a proposal has no events, webhooks or retention
            return
        try:
            self._through_outage("terminal event", jobs.publish_end, self.connection, job, queue,
                                 self.settings.result_ttl_s)
            if self.connection.exists(keys.DELETED_KEY.format(job.id)):
                self._purge_deleted(job)
        except Exception as e:  # noqa: BLE001 - the maintenance reconciles it later
            log.warning("job %s: end not announced: %s", job.id, e)

    def _purge_deleted(self, job: Job) -> None:
        """A job deleted while it ran: now that it stopped, remove it everywhere."""
        if self.storage is not None:
            jobs.lifecycle.remove_objects(self.storage, job.id, "deleted while running")
        jobs.purge(self.connection, job)

    def clean_registries(self):
        """RQ's maintenance; abandoned jobs first, each with its terminal event (the
        gateways run the same reaper, so this happens with no worker alive too)."""
        settle_s = self.settings.reaper_settle_s
        if not settled(self.connection, settle_s):
            # RQ's clean-up would fail the same just-restored jobs, without an event.
            return
        for queue in self._job_queues():
            reap(self.connection, queue, self.settings.result_ttl_s,
                 self.settings.worker_maintenance_interval_s, force=True)
        super().clean_registries()

    def _job_queues(self) -> list[Queue]:
        """The generation queues (mask proposals have no deadlines or events: RQ's own
        clean-up fails an abandoned one)."""
        return [q for q in self.queues if q.name != self.settings.mask_queue_name]

    def work(self, *args, **kwargs):
        self.start_announcing(self.warm)
        hooks = None
        if self.settings.webhook_delivery and self.settings.webhook_secrets:
            from .webhooks import start_thread

            hooks = start_thread(self.connection, self.settings)
        try:
            return super().work(*args, **kwargs)
        finally:
            self._alive_stop.set()
            self._alive.join(timeout=5)
            if hooks is not None:
                hooks[1].set()
                hooks[0].join(timeout=self.settings.webhook_timeout_s + 5)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.settings.worker_heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        batch = [job] + self._companions(job, queue)
        executions = [self.prepare_execution(j) for j in batch]
        stop = threading.Event()

        def beat() -> None:
            last_maintenance = time.monotonic()
            while not stop.wait(max(1.0, self.settings.worker_heartbeat_ttl_s / 3)):
                try:
                    for j, execution in zip(batch, executions, strict=True):
                        self.maintain_heartbeats(j, execution)
                    # RQ runs registry maintenance only between jobs; a busy worker runs
                    # it here, after its own heartbeat, so another worker's dead job is
                    # failed without waiting for an idle worker.
                    if (time.monotonic() - last_maintenance
                            >= self.settings.worker_maintenance_interval_s):
                        last_maintenance = time.monotonic()
                        self.clean_registries()
                except Exception as e:  # noqa: BLE001 - the next beat may succeed
                    log.warning("heartbeat for job %s failed: %s", job.id, e)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            if len(batch) > 1:
                self._sample_batch(batch, queue)
            # RQ's own lifecycle for each job (started, performed, recorded); a batched
            # job's function hands back the outcome computed above.
            for j, execution in zip(batch, executions, strict=True):
                self.perform_job(j, queue, execution)
        finally:
            stop.set()
            thread.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)

    # -- batching across requests ------------------------------------------------------
    def _companions(self, job: Job, queue: Queue) -> list[Job]:
        """Queued jobs with `job`'s batch key, claimed for one batch: up to BATCH_MAX in
        all, taken from the first jobs in the queue, waiting up to BATCH_WAIT_MS for
        more. A claimed job moves to RQ's intermediate queue, as RQ's own dequeue moves
        it: should this worker die before starting it, RQ's maintenance fails it."""
        key = records.batch_key_of(job)
        limit = self.settings.batch_max - 1
        if not key or limit < 1 or tasks.RUNTIME is None:
            return []
        found: list[Job] = []
        until = time.monotonic() + self.settings.batch_wait_ms / 1000
        try:
            while True:
                ids = queue.connection.lrange(queue.key, 0, BATCH_SCAN - 1)
                candidates = fetch_jobs(
                    [i.decode() if isinstance(i, bytes) else i for i in ids],
                    self.connection, self.job_class)
                for c in candidates:
                    if len(found) == limit:
                        break
                    if (c is not None and records.batch_key_of(c) == key
                            and claim(queue, c.id)):
                        found.append(c)
                left = until - time.monotonic()
                if len(found) == limit or left <= 0:
                    break
                time.sleep(min(0.01, left))
        except REDIS_DOWN as e:  # batch what was claimed; the rest stays queued
            log.warning("batching stopped: %s", e)
        if found:
            log.info("job %s: batched with %d queued jobs", job.id, len(found))
        return found

    def _sample_batch(self, batch: list[Job], queue: Queue) -> None:
        """Mark every job started, then sample them together; each job's outcome waits
        in the runtime for RQ to perform the job. The batch runs under the shortest
        job timeout."""
        rt = tasks.RUNTIME
        for j in batch:
            self.prepare_job_execution(j, remove_from_intermediate_queue=True)
        timeout = min(j.timeout or self.queue_class.DEFAULT_TIMEOUT for j in batch)
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=batch[0].id):
                outcomes = tasks.generate_batch(rt, batch)
        except JobTimeoutException as e:
            outcomes = {j.id: tasks.Outcome(error=e) for j in batch}
        for j in batch:
            j.outcome = outcomes.get(j.id)


def _is_proposal(job: Job) -> bool:
    try:
        return job.func_name == MASK_TASK
    except Exception:  # noqa: BLE001 - a record that is not JSON: not ours, a generation's
        return False
