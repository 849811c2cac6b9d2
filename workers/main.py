"""Worker entry point: settings, device, determinism, warm model cache, a non-forking RQ worker.

RQ's default worker forks per job; CUDA does not survive a fork and reloading weights per job
wastes seconds, so Adversa runs ``SimpleWorker`` (the job runs in the worker process itself) with
an LRU of loaded models. ``SimpleWorker`` sends no heartbeat during a job, so ours beats from a
thread (``workers.liveness``): a killed worker's job is run again, and every job still carries a
``job_timeout``.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from workers.device import configure_numerics
from workers.errors import ALIVE_KEY
from workers.jobs import install_context, make_context
from workers.liveness import HeartbeatWorker, wait_for_name
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no worker outlives `serve`."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_worker(settings: WorkerSettings, *, burst: bool = False, name: str | None = None) -> bool:
    """Serve the configured queues (``predict`` first) until stopped; returns RQ's ``work`` result."""
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is not set: expected the Redis the gateway uses")
    configure_numerics()
    context = make_context(settings)
    install_context(context)
    log.info("worker on %s, registry %s", context.cache.device,
             [str(r) for r in context.cache.index.roots])
    connection = Redis.from_url(settings.redis_url)
    queues = [Queue(settings.queue_name(q), connection=connection, serializer=JSONSerializer)
              for q in settings.queues]
    if name is not None:
        wait_for_name(connection, name, settings.heartbeat_ttl_s)
    worker = HeartbeatWorker(queues, connection=connection, serializer=JSONSerializer, name=name,
                             heartbeat_ttl=settings.heartbeat_ttl_s, retries=settings.job_retries,
                             result_ttl=settings.result_ttl_s)
    try:
        return bool(worker.work(burst=burst, with_scheduler=False))
    finally:
        connection.delete(ALIVE_KEY.format(worker.name))
