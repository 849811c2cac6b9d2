"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from service.deps import QueueDep
from service.errors import Problem
from service.metrics import QUEUE_DEPTH

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(queues: QueueDep) -> dict[str, object]:
    """Redis reachable and at least one worker alive."""
    try:
        queues.redis.ping()
        workers = queues.workers_alive()
    except RedisError as exc:
        raise Problem(503, f"Redis is not reachable: {exc}", code="not-ready") from None
    if workers == 0:
        raise Problem(503, "no worker is alive; start one with `adversa worker`", code="not-ready")
    return {"status": "ready", "workers": workers}


@router.get("/metrics")
def metrics(queues: QueueDep) -> Response:
    """Prometheus metrics: requests, latencies, queue depth."""
    try:
        for name, depth in queues.depth().items():
            QUEUE_DEPTH.labels(queue=name).set(depth)
    except RedisError:
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
