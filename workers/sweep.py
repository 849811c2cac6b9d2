"""The orphan-blob sweep: remove stored job inputs that no job references any more.

The gateway stores a job's inputs (``inputs/<job id>.npz``, ``uploads/<job id>/...``) before it
enqueues the job and removes them when enqueueing fails; a gateway killed in between leaves them
behind, and audit chunks leave ``audits/<audit id>/`` scratch. Every ``sweep_interval_s`` one worker
(a Redis lock, so that N workers sweep once) deletes such blobs that are older than
``sweep_grace_s`` and whose job neither Redis nor the history database knows. A job still queued,
running, or whose result is readable (in Redis or in the history) keeps its blobs; when in doubt
(Redis or the history database failing) nothing is deleted. Torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from sqlalchemy.exc import SQLAlchemyError

from history.store import HistoryStore
from models.store import BlobStore
from workers.settings import CommonSettings

log = logging.getLogger(__name__)
SWEEP_LOCK = "adversa:sweep"
SWEPT = ("inputs", "uploads", "audits")  # job ids: inputs/<id>.npz, uploads/<id>/f, audits/<id>/f


def job_of(key: str) -> str:
    """The id of the job a swept key belongs to."""
    name = key.split("/")[1]
    return name.split(".", 1)[0] if key.startswith("inputs/") else name


def referenced(redis: Redis, history: HistoryStore, job_ids: Iterable[str]) -> set[str]:
    """The ids of ``job_ids`` that a job in Redis or in the history database still has."""
    ids = sorted(set(job_ids))
    with redis.pipeline(transaction=False) as pipeline:
        for job_id in ids:
            pipeline.exists(Job.key_for(job_id))
        in_redis = {job_id for job_id, found in zip(ids, pipeline.execute(), strict=True) if found}
    return in_redis | history.known_ids(set(ids) - in_redis)


def sweep_orphans(store: BlobStore, redis: Redis, history: HistoryStore, grace_s: float,
                  now: float | None = None) -> list[str]:
    """Delete the swept blobs older than ``grace_s`` whose job is gone; the keys deleted."""
    cutoff = (time.time() if now is None else now) - grace_s
    old: dict[str, list[str]] = defaultdict(list)
    for prefix in SWEPT:
        for info in store.scan(prefix):
            if info.modified < cutoff:
                old[job_of(info.key)].append(info.key)
    if not old:
        return []
    keep = referenced(redis, history, old)
    deleted = sorted(key for job_id, keys in old.items() if job_id not in keep for key in keys)
    for key in deleted:
        store.delete(key)
    return deleted


class Sweeper:
    """A daemon thread that sweeps every ``sweep_interval_s`` (the first time at start); one
    worker at a time across machines: the lock expires rather than being released."""

    def __init__(self, settings: CommonSettings, store: BlobStore, redis: Redis, name: str) -> None:
        self.settings = settings
        self.store = store
        self.redis = redis
        self.name = name
        self.history = HistoryStore(settings.history_database_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="blob-sweep", daemon=True)

    def start(self) -> None:
        if self.settings.sweep_interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.history.close()

    def sweep_once(self) -> list[str] | None:
        """Sweep unless another worker did within the interval; the keys deleted, or None."""
        interval = self.settings.sweep_interval_s
        if not self.redis.set(SWEEP_LOCK, self.name, nx=True, ex=max(1, interval)):
            return None
        deleted = sweep_orphans(self.store, self.redis, self.history, self.settings.sweep_grace_s)
        if deleted:
            log.info("sweep: removed %d orphan blobs: %s", len(deleted), deleted[:20])
        return deleted

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep_once()
            except (RedisError, SQLAlchemyError, OSError) as exc:  # next time; nothing deleted on doubt
                log.warning("sweep failed: %s", exc)
            except Exception:  # S3 errors (botocore) and the like: keep the worker, say why
                log.exception("sweep failed")
            self._stop.wait(self.settings.sweep_interval_s)
