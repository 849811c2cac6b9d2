"""Job outcomes, durations and retries, kept in Redis by the workers for the gateway's ``/metrics``.

Workers run in other processes, often on other machines, and a job may end in a process that is not
the one that ran it (a live peer fails or retries the job of a dead worker). So each ending is
added to one Redis hash that every worker shares, as the cumulative buckets of a Prometheus
histogram; the gateway turns that hash into metric families when it is scraped (one ``HGETALL`` of
a few hundred fields, whatever the number of jobs). The workers write it (``workers.jobs``,
``workers.liveness``), the gateway reads it (``service.metrics``). Imports redis and rq: a server
module of ``contracts``, never imported by the client distribution.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

log = logging.getLogger(__name__)

JOB_METRICS_KEY = "adversa:{}metrics:jobs"
# From a prediction (tens of ms) to a training defense (hours).
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
           4 * 3600.0, 8 * 3600.0)
OUTCOMES = ("succeeded", "failed", "canceled", "worker-lost")


def metrics_key(queue_prefix: str) -> str:
    return JOB_METRICS_KEY.format(queue_prefix)


def _kind(job: Job) -> str:
    return str(job.meta.get("kind", "unknown")).replace("|", "-")


def seconds_since_start(job: Job) -> float:
    started = job.started_at
    if started is None:
        return 0.0
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - started).total_seconds())


def record_end(connection: Redis, key: str, job: Job, outcome: str, seconds: float) -> None:
    """One attempt of ``job`` ended with ``outcome`` after ``seconds``. Never raises: a job's end
    does not depend on its metrics being counted."""
    kind = _kind(job)
    try:
        with connection.pipeline() as pipeline:
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    pipeline.hincrby(key, f"b|{kind}|{outcome}|{i}", 1)
            pipeline.hincrby(key, f"n|{kind}|{outcome}", 1)
            pipeline.hincrbyfloat(key, f"s|{kind}|{outcome}", seconds)
            pipeline.execute()
    except RedisError as exc:
        log.warning("%s: its end (%s) was not counted in the metrics: %s", job.id, outcome, exc)


def record_retry(connection: Redis, key: str, job: Job) -> None:
    """``job`` runs again because the worker running it was lost."""
    try:
        connection.hincrby(key, f"r|{_kind(job)}", 1)
    except RedisError as exc:
        log.warning("%s: its retry was not counted in the metrics: %s", job.id, exc)


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    count: int = 0
    total: float = 0.0


@dataclass
class JobMetrics:
    durations: dict[tuple[str, str], Histogram]
    retries: dict[str, int]


def read(connection: Redis, key: str) -> JobMetrics:
    """What the workers recorded under ``key``, as histograms by (kind, outcome) and retries by kind."""
    durations: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
    retries: dict[str, int] = {}
    # cast: redis-py types every command as possibly awaitable (its asyncio client shares them)
    for raw_name, raw_value in cast(dict[Any, Any], connection.hgetall(key)).items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
        what, _, rest = name.partition("|")
        parts = rest.split("|")
        if what == "r" and len(parts) == 1:
            retries[parts[0]] = int(value)
        elif what == "n" and len(parts) == 2:
            durations[parts[0], parts[1]].count = int(value)
        elif what == "s" and len(parts) == 2:
            durations[parts[0], parts[1]].total = float(value)
        elif what == "b" and len(parts) == 3 and parts[2].isdigit() and int(parts[2]) < len(BUCKETS):
            durations[parts[0], parts[1]].buckets[int(parts[2])] = int(value)
    return JobMetrics(dict(durations), retries)
