"""Worker entry point: settings, device, determinism, warm model cache, a non-forking RQ worker.

RQ's default worker forks per job; CUDA does not survive a fork and reloading weights per job
wastes seconds, so Adversa runs ``SimpleWorker`` (the job runs in the worker process itself) with
an LRU of loaded models. ``SimpleWorker`` sends no heartbeat during a job, so every job carries a
``job_timeout``.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from workers.device import configure_numerics
from workers.errors import ALIVE_KEY, ALIVE_TTL_S
from workers.jobs import install_context, make_context
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
    worker = SimpleWorker(queues, connection=connection, serializer=JSONSerializer, name=name)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(connection, worker.name, stop), daemon=True)
    beat.start()
    try:
        return bool(worker.work(burst=burst, with_scheduler=False))
    finally:
        stop.set()
        connection.delete(ALIVE_KEY.format(worker.name))


def _heartbeat(connection: Redis, name: str, stop: threading.Event) -> None:
    """Refresh this worker's liveness key while it runs, jobs included: SimpleWorker itself sends
    no heartbeat during a job, so without this a killed worker's job would look running until its
    timeout. The gateway reports such a job as failed once the key expires."""
    while not stop.is_set():
        try:
            connection.set(ALIVE_KEY.format(name), 1, ex=ALIVE_TTL_S)
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)
        stop.wait(ALIVE_TTL_S / 3)
