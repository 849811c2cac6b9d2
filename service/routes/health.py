"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from service.deps import QueueDep
from service.errors import Problem
from service.metrics import QUEUE_DEPTH
from service.queueing import QUEUE_NAMES
from workers.liveness import live_workers

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(queues: QueueDep) -> dict[str, object]:
    """Redis reachable and at least one worker alive: its heartbeat at most ``heartbeat_ttl_s`` old
    (RQ's registration of a killed worker outlives it)."""
    names = {queues.settings.queue_name(q) for q in QUEUE_NAMES}
    try:
        queues.redis.ping()
        workers = live_workers(queues.redis, names, queues.settings.heartbeat_ttl_s)
    except RedisError as exc:
        raise Problem(503, f"Redis is not reachable: {exc}", code="not-ready") from None
    if not workers:
        raise Problem(503, "no worker is alive; start one with `adversa worker`", code="not-ready")
    return {"status": "ready", "workers": len(workers), "worker_names": workers}


@router.get("/metrics")
def metrics(queues: QueueDep) -> Response:
    """Prometheus metrics: requests, latencies, queue depth."""
    try:
        for name, depth in queues.depth().items():
            QUEUE_DEPTH.labels(queue=name).set(depth)
    except RedisError:
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
