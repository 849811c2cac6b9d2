"""Prometheus instruments of the gateway."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("adversa_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("adversa_request_seconds", "HTTP request latency", ["method", "route"])
QUEUE_DEPTH = Gauge("adversa_queue_depth", "Jobs waiting per queue", ["queue"])
JOBS = Counter("adversa_jobs_created_total", "Jobs created", ["kind"])


async def instrument(request: Request,
                     call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")
    REQUESTS.labels(request.method, path, str(response.status_code)).inc()
    LATENCY.labels(request.method, path).observe(time.perf_counter() - start)
    return response
