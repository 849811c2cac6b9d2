"""Warm workers: a worker loads its models (and their calibrated chunk sizes) before it takes a job,
and says how far it got in Redis, where ``/readyz`` reads it.

A cold worker answered the first prediction after ``make run`` late and ran an unannounced
batch-size calibration (47 s for the ResNet-18) inside the first job on each model. ``WarmWorker``
registers (its heartbeat starts, so it is alive and visible), publishes ``loading``, runs its
``warm_up`` (``workers.main.preload``) and only then enters RQ's loop: queued jobs wait for a warm
worker instead of paying for the loading. Its status, refreshed with every heartbeat, is JSON at
``contracts.liveness.WARM_KEY``, where the gateway reads it (``contracts.liveness.worker_status``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from rq.worker import WorkerStatus

from contracts.liveness import WARM_KEY, Status
from workers.liveness import DRAINING, Drained, HeartbeatWorker

log = logging.getLogger(__name__)
# What a worker runs before its first job: it updates the status through the callback it is given.
WarmUp = Callable[[Callable[[Status], None]], object]


class WarmWorker(HeartbeatWorker):
    """``HeartbeatWorker`` that runs ``warm_up`` after it registers and before it takes a job."""

    def __init__(self, queues: Any, *, warm_up: WarmUp | None = None, status: Status | None = None,
                 **kwargs: Any) -> None:
        super().__init__(queues, **kwargs)
        self.warm_up = warm_up
        self.status: Status = {"state": "loading", "models": {}, "failed": {}, **(status or {})}

    def beat(self) -> None:
        super().beat()
        self._publish()

    def publish(self, status: Status) -> None:
        """Replace the status and publish it now (the heartbeat keeps it fresh)."""
        self.status = status
        self._publish()

    def _publish(self) -> None:
        self.connection.set(WARM_KEY.format(self.name), json.dumps(self.status), ex=2 * self.heartbeat_ttl)

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        # SIGTERM while loading drains like SIGTERM during a job: the loading stops, no job is taken.
        # Busy: RQ's stop request then only flags the stop, which the loop honours before its first
        # job, instead of raising out of the loading.
        self._install_signal_handlers()
        self.set_state(WorkerStatus.BUSY)
        if self.warm_up is not None:
            try:
                self.warm_up(self.publish)
            except Drained:
                log.info("worker %s: stopped while loading", self.name)
            except Exception:  # a model that fails to load must not keep the worker from its jobs
                log.exception("worker %s: preloading failed; taking jobs cold", self.name)
        self.set_state(WorkerStatus.STARTED)
        if not DRAINING.is_set():
            self.publish({**self.status, "state": "warm", "loading": None})
            log.info("worker %s: warm (%s)", self.name, ", ".join(self.status["models"]) or "no models")

    def register_death(self) -> None:
        super().register_death()
        self.connection.delete(WARM_KEY.format(self.name))
