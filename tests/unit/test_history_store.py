"""The history store on SQLite and PostgreSQL: migrations, transactional writes, keyset
pagination, filters, team isolation and audit summaries."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from redis import Redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer
from sqlalchemy.exc import StatementError

from history.__main__ import main
from history.models import Base
from history.recording import audit_summary, record_finished, record_queued
from history.store import MIGRATIONS, HistoryStore, InvalidCursor, JobFilter, JobRecord
from tests.conftest import REPO
from workers.specs import JobError, JobState

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()  # the newest migration


@pytest.fixture
def store(history_url: str) -> Iterator[HistoryStore]:
    history = HistoryStore(history_url)
    yield history
    history.close()


def record(job_id: str, minute: int = 0, **fields: object) -> JobRecord:
    values: dict[str, object] = {"kind": "attack", "team": "red", "model": "fmnist-cnn@1",
                                 "spec": {"attack": {"name": "fgsm"}}, "status": JobState.queued,
                                 "created_at": T0 + timedelta(minutes=minute)}
    values.update(fields)
    return JobRecord(id=job_id, **values)  # type: ignore[arg-type]


def test_migrations_build_the_models_schema_once_even_from_two_processes_at_once(history_url: str) -> None:
    stores = [HistoryStore(history_url), HistoryStore(history_url)]
    errors: list[BaseException] = []

    def upgrade(history: HistoryStore) -> None:
        try:
            history.upgrade()
        except BaseException as exc:  # reported below: the assertion names it
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stores[0].upgrade()  # at head: nothing to do
    with stores[0].engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        version = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
    assert diff == []
    assert version == HEAD
    for history in stores:
        history.close()


def test_finished_state_and_result_land_together_and_a_late_queued_record_does_not_undo_them(
        store: HistoryStore) -> None:
    queued = record("a1")
    store.record_queued(queued)
    assert store.job("a1", "red").status == JobState.queued  # type: ignore[union-attr]
    done = replace(queued, status=JobState.succeeded, started_at=T0, ended_at=T0 + timedelta(seconds=3),
                   attempts=1)
    store.record_finished(done, {"scores": {"n": 4, "robust_accuracy": 0.25}})
    store.record_queued(queued)  # the gateway was slower than the worker
    job = store.job("a1", "red")
    assert job is not None
    assert (job.status, job.progress, job.model) == (JobState.succeeded, 1.0, "fmnist-cnn@1")
    assert job.result == {"scores": {"n": 4, "robust_accuracy": 0.25}}
    assert (job.created_at, job.ended_at) == ("2026-01-01T00:00:00Z", "2026-01-01T00:00:03Z")
    assert store.job("a1", "blue") is None


def test_a_failure_in_the_result_statement_rolls_back_the_final_state(store: HistoryStore) -> None:
    queued = record("t1")
    store.record_queued(queued)
    done = replace(queued, status=JobState.succeeded, ended_at=T0, attempts=1)
    # The job row is written first; the result cannot be serialised, so its INSERT fails.
    with pytest.raises((StatementError, TypeError)):  # SQLAlchemy or psycopg serialises it
        store.record_finished(done, {"scores": object()})
    job = store.job("t1", "red")
    assert job is not None
    assert (job.status, job.result, job.ended_at) == (JobState.queued, None, None)


KILLED_WRITER = """
import sys, threading
from datetime import UTC, datetime
from pathlib import Path
from sqlalchemy import event
from history.store import HistoryStore, JobRecord
from workers.specs import JobState

url, marker = sys.argv[1], Path(sys.argv[2])
store = HistoryStore(url)
seen = []

@event.listens_for(store.engine, "before_cursor_execute")
def pause(conn, cursor, statement, parameters, context, executemany):
    seen.append(statement.split("(")[0].strip())
    if statement.startswith("INSERT INTO results"):
        marker.write_text("\\n".join(seen))
        threading.Event().wait()  # killed here: the job row is written, its result is not

store.record_finished(JobRecord(id="k1", kind="attack", team="red", model="fmnist-cnn@1", spec={},
                                status=JobState.succeeded, created_at=datetime(2026, 1, 1, tzinfo=UTC),
                                ended_at=datetime.now(UTC), attempts=1), {"scores": {"n": 4}})
"""


def test_a_writer_killed_between_state_and_result_leaves_neither(store: HistoryStore, tmp_path: Path) -> None:
    store.record_queued(record("k1"))
    marker = tmp_path / "between"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, store.url, str(marker)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
        assert time.monotonic() < deadline, "the writer never reached the result"
        time.sleep(0.05)
    writer.kill()
    writer.wait(timeout=60)
    assert "INSERT INTO jobs" in marker.read_text().splitlines()
    job = store.job("k1", "red")
    assert job is not None
    assert (job.status, job.result, job.ended_at) == (JobState.queued, None, None)


def test_a_failed_job_keeps_its_error(store: HistoryStore) -> None:
    failed = record("f1", status=JobState.failed, ended_at=T0, attempts=2,
                    error=JobError(code="unknown-model", message="expected a model, got 'x'"))
    store.record_finished(failed)
    job = store.job("f1", "red")
    assert job is not None and job.error is not None
    assert (job.status, job.error.code, job.result) == (JobState.failed, "unknown-model", None)


def test_pages_are_newest_first_and_stable_under_concurrent_inserts(store: HistoryStore) -> None:
    for i in range(7):
        store.record_queued(record(f"p{i}", minute=i))
    store.record_queued(record("p3b", minute=3))  # same time as p3: the id breaks the tie
    seen: list[str] = []
    jobs, cursor = store.jobs("red", JobFilter(), limit=3)
    seen += [j.id for j in jobs]
    for i in range(3):  # newer jobs arrive while the client pages
        store.record_queued(record(f"new{i}", minute=100 + i))
    while cursor is not None:
        jobs, cursor = store.jobs("red", JobFilter(), cursor=cursor, limit=3)
        seen += [j.id for j in jobs]
    assert seen == ["p6", "p5", "p4", "p3b", "p3", "p2", "p1", "p0"]
    first, _ = store.jobs("red", JobFilter(), limit=3)
    assert [j.id for j in first] == ["new2", "new1", "new0"]


def test_filters_and_teams(store: HistoryStore) -> None:
    store.record_queued(record("k1", minute=1))
    store.record_queued(record("k2", minute=2, kind="audit", model="fmnist-cnn@2"))
    store.record_finished(record("k3", minute=3, model="other@1", status=JobState.succeeded, ended_at=T0),
                          {"ok": True})
    store.record_queued(record("k4", minute=4, team="blue"))

    def ids(where: JobFilter, team: str = "red") -> list[str]:
        return [j.id for j in store.jobs(team, where)[0]]

    assert ids(JobFilter()) == ["k3", "k2", "k1"]
    assert ids(JobFilter(), team="blue") == ["k4"]
    assert ids(JobFilter(kind="audit")) == ["k2"]
    assert ids(JobFilter(model="fmnist-cnn")) == ["k2", "k1"]
    assert ids(JobFilter(model="fmnist-cnn", model_version=1)) == ["k1"]
    assert ids(JobFilter(status=JobState.succeeded)) == ["k3"]
    assert ids(JobFilter(created_after=T0 + timedelta(minutes=1))) == ["k3", "k2"]
    assert ids(JobFilter(created_before=T0 + timedelta(minutes=3))) == ["k2", "k1"]
    assert store.jobs("red", JobFilter())[0][0].result is None  # listings leave results out


def test_a_cursor_not_handed_out_is_refused(store: HistoryStore) -> None:
    with pytest.raises(InvalidCursor):
        store.jobs("red", JobFilter(), cursor="not-a-cursor")


AUDIT_RESULT = {"n": 40, "suite": "quick", "clean_accuracy": 0.9,
                "robust_accuracy": {"linf:0.1": 0.5, "linf:0.3": 0.0},
                "gate": {"verdict": "fail", "lines": [{"line": "robust_accuracy@linf:0.1 >= 0.6",
                                                       "value": 0.5, "passed": False}]}}


def test_audit_summaries_across_versions_with_intervals(store: HistoryStore) -> None:
    summary = audit_summary(AUDIT_RESULT)
    half = summary.robust_accuracy["linf:0.1"]
    assert half["value"] == 0.5
    assert half["low"] is not None and half["high"] is not None
    assert 0.3 < half["low"] < 0.5 < half["high"] < 0.7  # Wilson 95% for 20/40: 0.352..0.648
    assert summary.verdict == "fail" and summary.gate == AUDIT_RESULT["gate"]["lines"]  # type: ignore[index]
    for i, version in enumerate((1, 2)):
        audit = record(f"au{version}", minute=i, kind="audit", model=f"fmnist-cnn@{version}",
                       status=JobState.succeeded, ended_at=T0)
        store.record_finished(audit, AUDIT_RESULT, summary)
    history = store.audits("red", "fmnist-cnn")
    assert [(a["id"], a["version"], a["verdict"]) for a in history] == [("au2", 2, "fail"), ("au1", 1, "fail")]
    assert history[0]["robust_accuracy"]["linf:0.3"]["value"] == 0.0
    assert store.audits("blue", "fmnist-cnn") == []


def test_the_upgrade_command_brings_an_empty_database_to_head(history_url: str) -> None:
    assert main(["upgrade", "--url", history_url]) == 0
    history = HistoryStore(history_url)
    with history.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == HEAD
    history.close()


def test_the_workers_record_of_a_real_rq_job_its_failure_retry_and_success(
        store: HistoryStore, redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVERSA_HISTORY_URL", store.url)
    queue = Queue("history-test", connection=redis, serializer=JSONSerializer)
    meta = {"kind": "audit", "team": "red", "model": "fmnist-cnn@3"}
    job = queue.enqueue("workers.audit_jobs.run_audit_merge", {"audit": {"suite": "quick"}}, meta=meta,
                        retry=Retry(max=1))
    record_queued(store, job)
    job.meta["error"] = {"code": "chunk-failed", "message": "1 of 2 chunk jobs did not finish"}
    record_finished(job)  # a retry follows: queued again, the error kept
    retried = store.job(job.id, "red")
    assert retried is not None and retried.error is not None
    assert (retried.status, retried.error.code) == (JobState.queued, "chunk-failed")
    job.retries_left = 0
    record_finished(job)
    failed = store.job(job.id, "red")
    assert failed is not None and (failed.status, failed.model) == (JobState.failed, "fmnist-cnn@3")
    record_finished(job, AUDIT_RESULT)
    succeeded = store.job(job.id, "red")
    assert succeeded is not None and (succeeded.status, succeeded.result) == (JobState.succeeded, AUDIT_RESULT)
    assert [(a["id"], a["version"], a["verdict"]) for a in store.audits("red", "fmnist-cnn")] == [
        (job.id, 3, "fail")]
    chunk = queue.enqueue("workers.audit_jobs.run_audit_chunk", {}, meta={**meta, "kind": "audit-chunk"})
    record_queued(store, chunk)
    record_finished(chunk, {"chunk": 0})
    assert store.job(chunk.id, "red") is None  # an audit is its merge job
