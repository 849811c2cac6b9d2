"""Prometheus metrics of the gateway and, read from Redis when scraped, of the queues and workers.

Two kinds of instrument:
- the gateway's own (requests, infer latency, job submissions, refusals), process-wide
  ``prometheus_client`` instruments updated as requests are answered;
- ``ServiceCollector``, read at scrape time: queue depth and age of the head of each queue, running
  jobs, live workers, and the job durations, outcomes and retries that the workers record in Redis
  (``contracts.telemetry``). Each scrape costs a fixed number of Redis calls per queue plus one
  ``HGETALL`` and one listing of the workers, whatever the number of jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from rq.job import Job
from rq.registry import StartedJobRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts import telemetry
from contracts.liveness import live_workers
from service.openapi import path_template
from service.queueing import QUEUE_NAMES, Queues

log = logging.getLogger(__name__)

REQUESTS = Counter("adversa_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("adversa_request_seconds", "HTTP request latency", ["method", "route"])
JOBS = Counter("adversa_jobs_created_total", "Jobs created", ["kind"])
INFER = Histogram("adversa_infer_seconds", "A prediction end to end in the gateway: decode, queue, the "
                  "worker's forward pass, encode", ["outcome"],
                  buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))

UNMATCHED = "unmatched"  # every path that no route matches: one label, however many paths
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


def route_label(scope: Scope) -> str:
    """The template of the route ``scope`` is for (``/v1/jobs/{job_id}``): the route's own when the
    router chose one, else (a middleware answered before routing: 413, 400) the OpenAPI document's
    template that the path falls under; ``UNMATCHED`` for a path that no route knows."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    app = scope.get("app")
    template = path_template(app, scope.get("path", "")) if isinstance(app, FastAPI) else None
    return template or UNMATCHED


class Instrument:
    """Count and time every HTTP request by method, route template and status. Outermost, so that
    answers made by the other middlewares (body limit, JSON depth, OIP errors) are counted too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            method = scope.get("method", "")
            method = method if method in METHODS else "other"
            route = route_label(scope)
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - start)


class ServiceCollector(Collector):
    """The queues, the workers and the jobs' outcomes, read from Redis on each scrape."""

    def __init__(self, queues: Queues) -> None:
        self.queues = queues
        self.names = QUEUE_NAMES

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        up = GaugeMetricFamily("adversa_redis_up", "1 when Redis answered this scrape, else 0")
        try:
            families = list(self._families())
        except RedisError as exc:
            log.warning("metrics: Redis failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        settings = self.queues.settings
        redis = self.queues.redis
        depth = GaugeMetricFamily("adversa_queue_depth", "Jobs waiting per queue", labels=["queue"])
        age = GaugeMetricFamily("adversa_queue_oldest_age_seconds", "How long the job at the head of "
                                "each queue has waited (0 when empty)", labels=["queue"])
        running = GaugeMetricFamily("adversa_jobs_running", "Jobs started per queue (a lost worker's "
                                    "count until its job is retried or failed)", labels=["queue"])
        now = datetime.now(UTC)
        for name in self.names:
            queue = self.queues.queue(name)
            with redis.pipeline(transaction=False) as pipeline:
                pipeline.llen(queue.key)
                pipeline.lindex(queue.key, 0)
                pipeline.zcard(StartedJobRegistry(queue=queue).key)
                count, head, started = pipeline.execute()
            waited = 0.0
            if head is not None:
                raw = redis.hget(Job.key_for(_text(head)), "enqueued_at")
                if raw:
                    enqueued = datetime.fromisoformat(_text(raw).replace("Z", "+00:00"))
                    enqueued = enqueued if enqueued.tzinfo else enqueued.replace(tzinfo=UTC)
                    waited = max(0.0, (now - enqueued).total_seconds())
            depth.add_metric([name], count)
            age.add_metric([name], waited)
            running.add_metric([name], started)
        yield depth
        yield age
        yield running
        workers = live_workers(redis, {settings.queue_name(q) for q in self.names}, settings.heartbeat_ttl_s)
        live = GaugeMetricFamily("adversa_workers_live", "Workers whose heartbeat is fresh "
                                 "(at most heartbeat_ttl_s old)")
        live.add_metric([], len(workers))
        yield live
        recorded = telemetry.read(redis, telemetry.metrics_key(settings.queue_prefix))
        durations = HistogramMetricFamily("adversa_job_duration_seconds", "Duration of each job attempt "
                                          "that ended, by kind and outcome (succeeded, failed, canceled, "
                                          "worker-lost)", labels=["kind", "outcome"])
        bounds = [str(b) for b in telemetry.BUCKETS]
        for (kind, outcome), histogram in sorted(recorded.durations.items()):
            buckets = [*zip(bounds, histogram.buckets, strict=True), ("+Inf", histogram.count)]
            durations.add_metric([kind, outcome], buckets, histogram.total)
        yield durations
        retries = CounterMetricFamily("adversa_job_retries", "Jobs run again because their worker "
                                      "was lost", labels=["kind"])
        for kind, value in sorted(recorded.retries.items()):
            retries.add_metric([kind], value)
        yield retries


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def registry_for(queues: Queues) -> CollectorRegistry:
    """A registry of this app's scrape-time metrics (the process-wide instruments live in the
    default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(queues))
    return registry
