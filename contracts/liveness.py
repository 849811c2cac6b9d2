"""Which workers are alive and warm, as the workers publish it in Redis and the gateway reads it.

Alive: RQ's worker registration with a heartbeat at most ``heartbeat_ttl_s`` old (the registration
alone outlives a killed worker), kept fresh by ``workers.liveness.HeartbeatWorker``; the job-level
``ALIVE_KEY`` is in ``contracts.errors``. Warm: the JSON status that ``workers.warm.WarmWorker``
refreshes with every heartbeat at ``WARM_KEY``::

    {"state": "loading" | "warm", "device": "cpu", "threads": 2,
     "models": {"fmnist-cnn@1": {"batch_size": 256}}, "loading": "fmnist-resnet18@1", "failed": {}}

``/readyz`` and ``/metrics`` read both. Imports redis and rq: a server module of ``contracts``,
never imported by the client distribution.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, cast

from redis import Redis
from rq.utils import now
from rq.worker import Worker

WARM_KEY = "adversa:warm:{}"
Status = dict[str, Any]


def live_workers(connection: Redis, queue_names: set[str], heartbeat_ttl_s: int) -> list[str]:
    """Names of the workers serving any of ``queue_names`` whose last heartbeat is at most
    ``heartbeat_ttl_s`` old (RQ's registration alone outlives a killed worker)."""
    cutoff = now() - timedelta(seconds=heartbeat_ttl_s)
    return sorted(w.name for w in Worker.all(connection=connection)
                  if w.death_date is None and w.last_heartbeat is not None
                  and w.last_heartbeat.replace(tzinfo=cutoff.tzinfo) >= cutoff
                  and queue_names & set(w.queue_names()))


def worker_status(connection: Redis, names: list[str]) -> dict[str, Status | None]:
    """The published status of each named worker; None for a worker that publishes none (one
    started by other code than ``workers.main``, which has nothing to preload)."""
    if not names:
        return {}
    raws = cast(list[Any], connection.mget([WARM_KEY.format(name) for name in names]))
    statuses: dict[str, Status | None] = {}
    for name, raw in zip(names, raws, strict=True):
        try:
            statuses[name] = json.loads(raw) if raw is not None else None
        except ValueError:
            statuses[name] = None
    return statuses


def is_warm(status: Status | None) -> bool:
    return status is None or status.get("state") == "warm"
