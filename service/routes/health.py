"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from contracts.liveness import is_warm, live_workers, worker_status
from service.deps import QueueDep
from service.errors import Problem
from service.queueing import QUEUE_NAMES

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(queues: QueueDep) -> dict[str, object]:
    """Redis reachable and at least one worker alive (its heartbeat at most ``heartbeat_ttl_s`` old:
    RQ's registration of a killed worker outlives it) and warm: its models loaded and calibrated
    (``contracts.liveness``). ``worker_status`` says, per live worker, what it has loaded (``models``,
    with their chunk sizes), what it is loading, its device and torch threads."""
    names = {queues.settings.queue_name(q) for q in QUEUE_NAMES}
    try:
        queues.redis.ping()
        workers = live_workers(queues.redis, names, queues.settings.heartbeat_ttl_s)
        statuses = worker_status(queues.redis, workers)
    except RedisError as exc:
        raise Problem(503, f"Redis is not reachable: {exc}", code="not-ready") from None
    if not workers:
        raise Problem(503, "no worker is alive; start one with `adversa worker`", code="not-ready")
    warm = [name for name in workers if is_warm(statuses[name])]
    if not warm:
        loading = ", ".join(f"{name} ({(statuses[name] or {}).get('loading') or 'starting'})"
                            for name in workers)
        raise Problem(503, f"no worker is warm yet: loading models ({loading}); queued jobs wait for "
                           "them", code="not-ready", headers={"Retry-After": "5"})
    return {"status": "ready", "workers": len(workers), "worker_names": workers, "warm": len(warm),
            "worker_status": statuses}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route template, infer latency, queue depth and age, live
    workers, job durations, outcomes and retries (README, "Metrics")."""
    scraped = request.app.state.metrics
    return Response(generate_latest() + generate_latest(scraped), media_type=CONTENT_TYPE_LATEST)
