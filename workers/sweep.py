"""The orphan-blob sweep: remove stored job inputs that no job references any more.

The gateway stores a job's inputs (``inputs/<job id>.npz``, ``uploads/<job id>/...``) before it
enqueues the job and removes them when enqueueing fails; a gateway killed in between leaves them
behind, and audit chunks leave ``audits/<audit id>/`` scratch. Every ``sweep_interval_s`` one worker
(a Redis lock, so that N workers sweep once) deletes such blobs that are older than
``sweep_grace_s`` and whose job neither Redis nor the history database knows. A job still queued,
running, or whose result is readable (in Redis or in the history) keeps its blobs; when in doubt
(Redis or the history database failing) nothing is deleted.

With ``retention_days`` > 0 the same sweep also purges finished jobs (succeeded, failed, canceled)
that ended longer ago than that, oldest first, at most ``PURGE_LIMIT`` per sweep in batches of
``PURGE_BATCH``: their Redis keys, their blobs (``jobs/<id>/``, ``inputs/<id>.npz``, ``uploads/<id>/``,
``audits/<id>/``), then their history rows in one transaction per batch. The blobs go first: a
purge cut short leaves a job whose rows the next sweep removes, never blobs nobody can find. A job
Redis still has queued or running is left alone, and model versions are no job's blobs. The sweep
also removes the files of registry publications cut short in the store (``registry/``, S3
backend: ``models.registry_store.sweep_unpublished``). Torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from sqlalchemy.exc import SQLAlchemyError

from contracts.errors import CANCEL_KEY
from history.store import HistoryStore
from models.registry_store import sweep_unpublished
from models.store import BlobStore
from workers.settings import CommonSettings

log = logging.getLogger(__name__)
SWEEP_LOCK = "adversa:sweep"
SWEPT = ("inputs", "uploads", "audits")  # job ids: inputs/<id>.npz, uploads/<id>/f, audits/<id>/f
PURGE_BATCH = 100  # jobs per history transaction
PURGE_LIMIT = 1000  # jobs per sweep: a backlog drains over several sweeps
DONE = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})


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


def forget_in_redis(redis: Redis, job_ids: list[str]) -> set[str]:
    """Delete the Redis jobs of ``job_ids`` that Redis holds finished (an audit with its chunk
    jobs), and their cancel flags; the ids Redis holds in any other state, which stay."""
    busy: set[str] = set()
    for job_id, job in zip(job_ids, Job.fetch_many(job_ids, redis, serializer=JSONSerializer), strict=True):
        if job is None:
            continue
        if job.get_status(refresh=False) not in DONE:
            busy.add(job_id)
            continue
        chunk_ids = [str(cid) for cid in job.meta.get("chunks", [])]
        for chunk in Job.fetch_many(chunk_ids, redis, serializer=JSONSerializer):
            if chunk is not None and chunk.get_status(refresh=False) in DONE:
                chunk.delete(remove_from_queue=True)
        job.delete(remove_from_queue=True)
    redis.delete(*(CANCEL_KEY.format(job_id) for job_id in job_ids))
    return busy


def delete_job_blobs(store: BlobStore, job_id: str) -> None:
    """Every blob a job keeps under its id: artifacts, inputs, a staged upload, audit chunks."""
    store.delete_prefix(f"jobs/{job_id}")
    store.delete(f"inputs/{job_id}.npz")
    store.delete_prefix(f"uploads/{job_id}")
    store.delete_prefix(f"audits/{job_id}")


def purge_expired(store: BlobStore, redis: Redis, history: HistoryStore, retention_days: float,
                  now: float | None = None, batch: int = PURGE_BATCH, limit: int = PURGE_LIMIT
                  ) -> list[str]:
    """Purge at most ``limit`` finished jobs that ended more than ``retention_days`` ago (Redis
    keys, blobs, history rows), ``batch`` at a time; the ids purged."""
    if retention_days <= 0:
        return []
    cutoff = datetime.fromtimestamp(time.time() if now is None else now, UTC) - timedelta(days=retention_days)
    purged: list[str] = []
    skipped: set[str] = set()
    while len(purged) + len(skipped) < limit:
        wanted = min(batch, limit - len(purged) - len(skipped))
        ids = history.expired(cutoff, wanted, skip=skipped)
        if not ids:
            break
        busy = forget_in_redis(redis, ids)
        if busy:
            log.warning("retention: Redis still runs %d jobs the history says finished, kept: %s",
                        len(busy), sorted(busy)[:20])
            skipped |= busy
        free = [job_id for job_id in ids if job_id not in busy]
        for job_id in free:
            if job_id.isalnum():  # the gateway's ids; anything else can name no blob
                delete_job_blobs(store, job_id)
        done = history.purge(free, cutoff)
        purged += done
        skipped |= set(free) - set(done)  # ran again since listed: each id ends purged or skipped
        if done:
            log.info("retention: purged %d jobs that ended before %s: %s", len(done),
                     cutoff.isoformat(timespec="seconds"), done[:20])
        if len(ids) < wanted:
            break
    return purged


class Sweeper:
    """A daemon thread that sweeps every ``sweep_interval_s`` (the first time at start); one
    worker at a time across machines: the lock expires rather than being released."""

    def __init__(self, settings: CommonSettings, store: BlobStore, redis: Redis, name: str) -> None:
        self.settings = settings
        self.store = store
        self.redis = redis
        self.name = name
        self.history = HistoryStore(settings.history_database_url)
        self.purged: list[str] = []  # the jobs the last sweep purged
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
        unpublished = sweep_unpublished(self.store, self.settings.sweep_grace_s)
        if unpublished:
            log.info("sweep: removed %d files of unfinished registry publications: %s",
                     len(unpublished), unpublished[:20])
        self.purged = purge_expired(self.store, self.redis, self.history, self.settings.retention_days)
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
