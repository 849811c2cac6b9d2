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
from collections.abc import Callable

import torch
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from rq import Queue
from rq.serializers import JSONSerializer

from contracts.liveness import Status
from models.manifest import HOSTED_DIR, CardIndex
from workers.device import configure_numerics
from workers.errors import ALIVE_KEY
from workers.jobs import Context, install_context, make_context
from workers.liveness import DRAINING, Drained, wait_for_name
from workers.settings import WorkerSettings
from workers.sweep import Sweeper
from workers.warm import WarmWorker

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no worker outlives `serve`."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def apply_threads(settings: WorkerSettings) -> int:
    """``ADVERSA_TORCH_THREADS``: torch's intra-op threads (unset: torch's default, one per core).
    Two workers on one machine each using every core run slower than one: give each its share."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    return torch.get_num_threads()


def preload_refs(context: Context) -> list[str]:
    """The models ``preload`` warms: the configured ones, or the hosted ones (undefended first, as
    many as the model cache keeps)."""
    refs = context.settings.preload_refs
    if refs is not None:
        return refs
    hosted = CardIndex([HOSTED_DIR])
    cards = [card for card in (hosted.card(name) for name in hosted.names()) if card is not None]
    cards.sort(key=lambda card: (card.lineage.base_model is not None, card.name))
    return [card.ref for card in cards[: context.cache.capacity]]


def preload(context: Context, publish: Callable[[Status], None]) -> Status:
    """Load each model of ``preload_refs`` into the cache and calibrate its chunk size (remembered
    per model version and device: only the first start on a machine measures), publishing progress.
    A model that fails to load is reported and skipped. Stops early when the worker drains."""
    status: Status = {"state": "loading", "device": str(context.cache.device),
                      "threads": torch.get_num_threads(), "models": {}, "failed": {}, "loading": None}
    for ref in preload_refs(context):
        if DRAINING.is_set():
            break
        publish({**status, "loading": ref})

        def on_candidate(i: int, size: int, ref: str = ref) -> None:
            if DRAINING.is_set():
                raise Drained("the worker is shutting down")
            publish({**status, "loading": ref, "calibrating": {"batch_size": size, "candidate": i + 1}})

        try:
            card, model = context.cache.get(ref)
            status["models"][card.ref] = {"batch_size": context.cache.batch_size(card, model, on_candidate)}
        except Exception as exc:  # reported in the status; jobs on that model fail on their own
            log.warning("preloading %s failed: %s", ref, exc)
            status["failed"][ref] = f"{type(exc).__name__}: {exc}"
    publish({**status, "loading": None})
    return status


def run_worker(settings: WorkerSettings, *, burst: bool = False, name: str | None = None) -> bool:
    """Serve the configured queues (``predict`` first) until stopped; returns RQ's ``work`` result.
    The worker preloads its models first (``workers.warm``)."""
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is not set: expected the Redis the gateway uses")
    configure_numerics()
    threads = apply_threads(settings)
    context = make_context(settings)
    install_context(context)
    log.info("worker on %s, registry %s", context.cache.device,
             [str(r) for r in context.cache.index.roots])
    # A Redis restart (seconds, AOF keeps the jobs) must not kill the worker or fail its job: every
    # command, RQ's bookkeeping included, retries for about 7 s (0.1 s doubling to 1 s) before an
    # error reaches the job or the work loop. Without it one refused connect in the restart's
    # window crashed the worker and left its started job to wait for another worker.
    connection = Redis.from_url(settings.redis_url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 10),
                                retry_on_error=[RedisConnectionError, RedisTimeoutError])
    queues = [Queue(settings.queue_name(q), connection=connection, serializer=JSONSerializer)
              for q in settings.queues]
    if name is not None:
        wait_for_name(connection, name, settings.heartbeat_ttl_s)
    worker = WarmWorker(queues, connection=connection, serializer=JSONSerializer, name=name,
                        heartbeat_ttl=settings.heartbeat_ttl_s, retries=settings.job_retries,
                        result_ttl=settings.result_ttl_s, queue_prefix=settings.queue_prefix,
                        warm_up=lambda publish: preload(context, publish),
                        status={"device": str(context.cache.device), "threads": threads})
    sweeper = Sweeper(settings, context.store, connection, worker.name)
    if not burst:
        sweeper.start()
    try:
        return bool(worker.work(burst=burst, with_scheduler=False))
    finally:
        sweeper.stop()
        connection.delete(ALIVE_KEY.format(worker.name))
