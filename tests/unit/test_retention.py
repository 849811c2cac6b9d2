"""The retention purge (``ADVERSA_RETENTION_DAYS``): the history store's purge on SQLite and
PostgreSQL, and the sweep on both blob store backends and a real Redis: finished jobs past the
retention lose their rows, blobs and Redis keys; every other job keeps all of them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from sqlalchemy import func, select

from contracts.errors import CANCEL_KEY
from history.models import AuditRow, JobRow, ResultRow
from history.store import AuditSummary, HistoryStore, JobFilter, JobRecord
from models.store import BlobStore, FileStore
from tests.history_db import DATABASES, database
from tests.s3server import any_store, s3_server  # noqa: F401 - fixtures
from workers.settings import CommonSettings
from workers.specs import JobError, JobState
from workers.sweep import Sweeper, purge_expired

NOW = datetime(2026, 6, 1, tzinfo=UTC)
RETENTION_DAYS = 30
SUMMARY = AuditSummary(n=4, suite="quick", clean_accuracy=1.0, robust_accuracy={}, verdict=None, gate=None)


def finished(history: HistoryStore, job_id: str, days_ago: float, status: JobState = JobState.succeeded,
             team: str = "red", kind: str = "attack") -> None:
    ended = NOW - timedelta(days=days_ago)
    record = JobRecord(id=job_id, kind=kind, team=team, model="fmnist-cnn@1", spec={}, status=status,
                       created_at=ended - timedelta(minutes=5), started_at=ended - timedelta(minutes=4),
                       ended_at=ended, attempts=1,
                       error=None if status == JobState.succeeded else JobError(code="x", message="x"))
    result = {"artifacts": ["grid.png"]} if status == JobState.succeeded else None
    history.record_finished(record, result, SUMMARY if kind == "audit" and result else None)


def unfinished(history: HistoryStore, job_id: str, status: JobState, days_ago: float) -> None:
    created = NOW - timedelta(days=days_ago)
    history.record_queued(JobRecord(id=job_id, kind="attack", team="red", model=None, spec={}, status=status,
                                    created_at=created,
                                    started_at=created if status == JobState.running else None))


def count(history: HistoryStore, table: Any) -> int:
    with history.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.fixture(params=DATABASES)
def history(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    with database(request.param, tmp_path) as url:
        store = HistoryStore(url)
        yield store
        store.close()


def test_the_store_purges_finished_jobs_past_the_cutoff_of_any_team_and_nothing_else(
        history: HistoryStore) -> None:
    finished(history, "old1", 90)
    finished(history, "old2", 60, JobState.failed, team="blue")
    finished(history, "old3", 45, JobState.canceled)
    finished(history, "aud1", 40, kind="audit", team="blue")
    finished(history, "new1", 29)
    finished(history, "new2", 1, team="blue")
    unfinished(history, "run1", JobState.running, 100)
    unfinished(history, "que1", JobState.queued, 100)
    cutoff = NOW - timedelta(days=RETENTION_DAYS)

    assert history.expired(cutoff, 2) == ["old1", "old2"]  # oldest first, bounded
    assert history.expired(cutoff, 10) == ["old1", "old2", "old3", "aud1"]
    assert history.expired(cutoff, 10, skip=["old2"]) == ["old1", "old3", "aud1"]
    assert count(history, ResultRow) == 4 and count(history, AuditRow) == 1
    # rechecked at delete time: recent, running and queued jobs named by mistake stay
    assert history.purge(["new1", "run1", "que1", "nope"], cutoff) == []
    assert history.purge(["old1", "old2", "old3", "aud1", "new1"], cutoff) == ["aud1", "old1", "old2", "old3"]

    assert history.expired(cutoff, 10) == []
    assert count(history, JobRow) == 4 and count(history, ResultRow) == 2 and count(history, AuditRow) == 0
    assert history.job("old1", "red") is None and history.job("aud1", "blue") is None
    assert history.audits("blue", "fmnist-cnn") == []
    red, _ = history.jobs("red", JobFilter())
    blue, _ = history.jobs("blue", JobFilter())
    assert sorted(job.id for job in red) == ["new1", "que1", "run1"]
    assert [job.id for job in blue] == ["new2"]
    kept = history.job("new1", "red")
    assert kept is not None and kept.result == {"artifacts": ["grid.png"]}


def job_blobs(job_id: str) -> list[str]:
    return [f"jobs/{job_id}/grid.png", f"jobs/{job_id}/samples.csv", f"inputs/{job_id}.npz",
            f"audits/{job_id}/chunk-0.npz", f"uploads/{job_id}/model.onnx"]


def all_keys(store: BlobStore) -> list[str]:
    return sorted(key for prefix in ("inputs", "uploads", "audits", "jobs", "datasets")
                  for key in store.list(prefix))


def in_redis(redis: Redis, job_id: str, status: JobStatus, **meta: Any) -> None:
    job = Queue("attacks", connection=redis, serializer=JSONSerializer).enqueue_call(
        "workers.jobs.run_attack", args=({},), job_id=job_id, meta=meta)
    if status != JobStatus.QUEUED:
        job.set_status(status)


def test_the_sweep_purges_blobs_redis_keys_and_rows_of_expired_jobs_in_batches(
        any_store: BlobStore, redis: Redis, tmp_path: Path) -> None:  # noqa: F811
    history = HistoryStore(f"sqlite:///{tmp_path / 'history.db'}")
    try:
        for job_id, days in (("old1", 90), ("old2", 80), ("old3", 70), ("aud1", 60)):
            finished(history, job_id, days, kind="audit" if job_id == "aud1" else "attack")
        finished(history, "busy1", 50)  # the history says finished, Redis runs it again: kept
        finished(history, "new1", 2)
        unfinished(history, "run1", JobState.running, 100)
        in_redis(redis, "aud1", JobStatus.FINISHED, chunks=["chk1", "chk2"])
        in_redis(redis, "chk1", JobStatus.FINISHED)
        in_redis(redis, "chk2", JobStatus.FINISHED)
        in_redis(redis, "busy1", JobStatus.STARTED)
        in_redis(redis, "run1", JobStatus.STARTED)
        redis.set(CANCEL_KEY.format("old1"), 1)
        kept = ["datasets/abc.npz"] + [key for job_id in ("busy1", "new1", "run1") for key in job_blobs(job_id)]
        purged_blobs = [key for job_id in ("old1", "old2", "old3", "aud1") for key in job_blobs(job_id)]
        for key in kept + purged_blobs:
            any_store.put(key, b"x")

        assert purge_expired(any_store, redis, history, 0, now=NOW.timestamp()) == []  # 0: keep forever
        assert all_keys(any_store) == sorted(kept + purged_blobs)

        first = purge_expired(any_store, redis, history, RETENTION_DAYS, now=NOW.timestamp(), batch=2, limit=3)
        assert first == ["old1", "old2", "old3"]  # bounded per sweep, oldest first
        rest = purge_expired(any_store, redis, history, RETENTION_DAYS, now=NOW.timestamp(), batch=2, limit=3)
        assert rest == ["aud1"]
        assert all_keys(any_store) == sorted(kept)
        assert not any(redis.exists(Job.key_for(job_id)) for job_id in ("aud1", "chk1", "chk2"))
        assert not redis.exists(CANCEL_KEY.format("old1"))
        assert redis.exists(Job.key_for("busy1")) and redis.exists(Job.key_for("run1"))
        assert history.known_ids(["old1", "old2", "old3", "aud1", "busy1", "new1", "run1"]) == {
            "busy1", "new1", "run1"}
        assert purge_expired(any_store, redis, history, RETENTION_DAYS, now=NOW.timestamp()) == []
    finally:
        history.close()


def test_the_sweeper_purges_with_a_retention_setting(tmp_path: Path, redis: Redis) -> None:
    settings = CommonSettings(var_dir=tmp_path, sweep_interval_s=3600, sweep_grace_s=3600,
                              retention_days=RETENTION_DAYS)
    store = FileStore(settings.blob_root)
    history = HistoryStore(settings.history_database_url)
    sweeper = Sweeper(settings, store, redis, "w1")
    try:
        ended = datetime.now(UTC) - timedelta(days=RETENTION_DAYS + 1)
        for job_id, end in (("old1", ended), ("new1", datetime.now(UTC))):
            history.record_finished(JobRecord(id=job_id, kind="attack", team="red", model=None, spec={},
                                              status=JobState.succeeded, created_at=end, ended_at=end),
                                    {"artifacts": ["grid.png"]})
            store.put(f"jobs/{job_id}/grid.png", b"x")
        assert sweeper.sweep_once() == []  # no orphans
        assert sweeper.purged == ["old1"]
        assert store.list("jobs") == ["jobs/new1/grid.png"]
    finally:
        sweeper.stop()
        history.close()
