"""The orphan-blob sweep on both store backends, a real Redis and a real history database: it
removes old inputs no job references, and nothing else."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.serializers import JSONSerializer

from history.store import HistoryStore, JobRecord
from models.store import BlobStore
from tests.history_db import DATABASES, database
from tests.s3server import any_store, s3_server  # noqa: F401 - fixtures
from workers.settings import CommonSettings
from workers.specs import JobState
from workers.sweep import Sweeper, sweep_orphans

GRACE_S = 600
KEPT = ["inputs/q1.npz",  # a queued job, in Redis
        "uploads/h1/model.onnx", "inputs/h1.npz",  # a finished job only the history still has
        "jobs/o1/grid.png", "datasets/abc.npz"]  # artifacts and data sets are not the sweep's
ORPHANS = ["audits/o3/chunk-0.npz", "inputs/o1.npz", "uploads/o2/weights.safetensors"]


@pytest.fixture
def history(tmp_path: Path) -> Iterator[HistoryStore]:
    store = HistoryStore(f"sqlite:///{tmp_path / 'history.db'}")
    yield store
    store.close()


def populate(store: BlobStore, redis: Redis, history: HistoryStore) -> None:
    Queue("attacks", connection=redis, serializer=JSONSerializer).enqueue_call(
        "workers.jobs.run_attack", args=({},), job_id="q1")
    history.record_queued(JobRecord(id="h1", kind="registration", team="red", model="m", spec={},
                                    status=JobState.succeeded, created_at=datetime.now(UTC)))
    for key in KEPT + ORPHANS:
        store.put(key, b"x")


def all_keys(store: BlobStore) -> list[str]:
    prefixes = ("inputs", "uploads", "audits", "jobs", "datasets")
    return sorted(key for prefix in prefixes for key in store.list(prefix))


def test_sweep_removes_old_unreferenced_inputs_only(any_store: BlobStore, redis: Redis,  # noqa: F811
                                                    history: HistoryStore) -> None:
    populate(any_store, redis, history)
    assert sweep_orphans(any_store, redis, history, GRACE_S) == []  # all younger than the grace
    assert all_keys(any_store) == sorted(KEPT + ORPHANS)
    later = time.time() + GRACE_S + 60
    assert sweep_orphans(any_store, redis, history, GRACE_S, now=later) == ORPHANS
    assert all_keys(any_store) == sorted(KEPT)
    assert sweep_orphans(any_store, redis, history, GRACE_S, now=later) == []


def test_nothing_is_deleted_when_redis_does_not_answer(tmp_path: Path, history: HistoryStore) -> None:
    from models.store import FileStore

    store = FileStore(tmp_path / "blobs")
    store.put("inputs/o1.npz", b"x")
    down = Redis(host="127.0.0.1", port=1, socket_connect_timeout=2)
    with pytest.raises(RedisError):
        sweep_orphans(store, down, history, 0, now=time.time() + 60)
    assert store.exists("inputs/o1.npz")


@pytest.mark.parametrize("kind", DATABASES)
def test_history_knows_ids_of_any_team(kind: str, tmp_path: Path) -> None:
    with database(kind, tmp_path) as url:
        store = HistoryStore(url)
        try:
            for job_id, team in (("a1", "red"), ("b1", "blue")):
                store.record_queued(JobRecord(id=job_id, kind="attack", team=team, model=None, spec={},
                                              status=JobState.queued, created_at=datetime.now(UTC)))
            assert store.known_ids(["a1", "b1", "c1"]) == {"a1", "b1"}
            assert store.known_ids([f"x{i}" for i in range(1200)] + ["b1"]) == {"b1"}
            assert store.known_ids([]) == set()
        finally:
            store.close()


def test_one_worker_sweeps_per_interval_and_the_thread_sweeps(tmp_path: Path, redis: Redis) -> None:
    from models.store import FileStore

    store = FileStore(tmp_path / "blobs")
    settings = CommonSettings(var_dir=tmp_path, sweep_interval_s=3600, sweep_grace_s=0)
    first, second = (Sweeper(settings, store, redis, name) for name in ("w1", "w2"))
    try:
        store.put("inputs/o1.npz", b"x")
        first.start()  # sweeps at once, then every hour
        deadline = time.monotonic() + 60
        while store.exists("inputs/o1.npz"):
            assert time.monotonic() < deadline, "the sweep thread never removed the orphan"
            time.sleep(0.1)
        store.put("inputs/o2.npz", b"x")
        assert second.sweep_once() is None  # the lock: swept within this interval already
        assert store.exists("inputs/o2.npz")
        redis.delete("adversa:sweep")
        assert second.sweep_once() == ["inputs/o2.npz"]
    finally:
        first.stop()
        second.stop()
