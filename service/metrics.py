"""Prometheus metrics, read from Redis at scrape time (the worker writes counters there).

Every value is the cluster's (the whole queue, all workers), so every gateway replica
exports the same series: aggregate them with max(), never sum() (the shipped recording
rules, deploy/prometheus-rules.yaml, do). Current states are gauges; events are
counters named `_total`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import Redis
from rq import Queue

from .keys import DURATION_KEY, METRICS_KEY
from .workers import live_workers

DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class RedisCollector:
    def __init__(self, redis: Redis, queue: Queue):
        self.redis, self.queue = redis, queue

    def collect(self):
        q = self.queue
        by_status = GaugeMetricFamily("magicface_jobs", "Jobs now queued or running",
                                      labels=["status"])
        by_status.add_metric(["queued"], q.count)
        by_status.add_metric(["running"], q.started_job_registry.get_job_count(cleanup=False))
        yield by_status
        counters = {k.decode(): float(v) for k, v in self.redis.hgetall(METRICS_KEY).items()}
        ended = CounterMetricFamily("magicface_jobs_ended", "Jobs that ended, by how",
                                    labels=["status"])
        for status in ("succeeded", "failed", "canceled", "expired"):
            ended.add_metric([status], counters.get(f"jobs_{status}", 0.0))
        yield ended
        submitted = CounterMetricFamily("magicface_jobs_submitted",
                                        "Jobs accepted by the gateways")
        submitted.add_metric([], counters.get("jobs_submitted", 0.0))
        yield submitted
        ended_queued = CounterMetricFamily("magicface_jobs_ended_while_queued",
                                           "Jobs canceled or expired before they ran",
                                           labels=["state"])
        for state in ("canceled", "expired"):
            ended_queued.add_metric([state], counters.get(f"queued_{state}", 0.0))
        yield ended_queued
        live = GaugeMetricFamily("magicface_workers", "Live workers (model loaded) on "
                                                      "this queue")
        live.add_metric([], len(live_workers(self.redis, q.name)))
        yield live
        depth = GaugeMetricFamily("magicface_queue_depth", "Jobs waiting in the queue")
        depth.add_metric([], q.count)
        yield depth
        hist = {k.decode(): float(v) for k, v in self.redis.hgetall(DURATION_KEY).items()}
        buckets, cumulative = [], 0.0
        for b in DURATION_BUCKETS:
            cumulative = hist.get(f"le_{b}", cumulative)
            buckets.append((str(float(b)), cumulative))
        buckets.append(("+Inf", hist.get("count", 0.0)))
        h = HistogramMetricFamily("magicface_job_duration_seconds",
                                  "Wall time of finished jobs on the worker")
        h.add_metric([], buckets, sum_value=hist.get("sum", 0.0))
        yield h
        for name, text in (("sampling_batches", "Sampling runs on the workers: one per lone "
                                                "job, one per batch of jobs"),
                           ("sampled_jobs", "Jobs sampled, alone or in batches (over "
                                            "magicface_sampling_batches: the mean batch)")):
            c = CounterMetricFamily(f"magicface_{name}", text)
            c.add_metric([], counters.get(name, 0.0))
            yield c
        for name in ("hits", "misses"):
            c = CounterMetricFamily(f"magicface_kv_cache_{name}",
                                    f"Reference K/V cache {name} reported by workers")
            c.add_metric([], counters.get(f"kv_cache_{name}", 0.0))
            yield c


def _registry(redis: Redis, queue: Queue) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RedisCollector(redis, queue))
    return registry


def render(redis: Redis, queue: Queue) -> bytes:
    return generate_latest(_registry(redis, queue))


def serve(port: int, host: str, redis: Redis, queue: Queue) -> None:
    """Serve the metrics, without a key, on their own port (a thread), for a scraper
    on the internal network."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=_registry(redis, queue))


def observe_duration(redis: Redis, seconds: float) -> None:
    """Called by the worker: cumulative histogram buckets in one Redis hash."""
    pipe = redis.pipeline()
    for b in DURATION_BUCKETS:
        if seconds <= b:
            pipe.hincrbyfloat(DURATION_KEY, f"le_{b}", 1)
    pipe.hincrbyfloat(DURATION_KEY, "count", 1)
    pipe.hincrbyfloat(DURATION_KEY, "sum", seconds)
    pipe.execute()


def count(redis: Redis, name: str, amount: float = 1) -> None:
    redis.hincrbyfloat(METRICS_KEY, name, amount)
