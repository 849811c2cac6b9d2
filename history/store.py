"""The history store: SQLAlchemy 2 over SQLite (default) or PostgreSQL, migrated by Alembic on first
use. A job's final state, its result and its audit summary are written in one transaction."""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, and_, create_engine, delete, event, make_url, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from contracts.specs import JobError, JobState, JobView
from history.models import AuditRow, JobRow, ResultRow
from models.manifest import parse_ref

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x61647672  # PostgreSQL advisory lock held while migrating ("advr")
TERMINAL = (JobState.succeeded, JobState.failed, JobState.canceled)


class InvalidCursor(ValueError):
    """A pagination cursor this store did not hand out."""


@dataclass(frozen=True)
class JobRecord:
    """One job's row: what the gateway knows when it queues it, or the worker when it ends."""

    id: str
    kind: str
    team: str
    model: str | None
    spec: dict[str, Any]
    status: JobState
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    attempts: int = 0
    error: JobError | None = None


@dataclass(frozen=True)
class AuditSummary:
    """What an audit's result says, kept to compare a model's versions (see ``AuditRow``)."""

    n: int
    suite: str | None
    clean_accuracy: float | None
    robust_accuracy: dict[str, dict[str, float | None]]
    verdict: str | None
    gate: list[Any] | None


@dataclass(frozen=True)
class JobFilter:
    kind: str | None = None
    model: str | None = None
    model_version: int | None = None
    status: JobState | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None


def database_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy's default driver is psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    parsed = make_url(database_url(url))
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": 60})

    # Python's sqlite3 does not begin transactions before DDL and takes write locks late; let
    # SQLAlchemy emit BEGIN itself (SQLAlchemy's documented recipe), IMMEDIATE for writers, so that
    # a migration is one transaction and two writers queue on the lock instead of failing.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _set_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        write = connection.get_execution_options().get("history_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _set_wal(cursor: Any, timeout_s: float = 60.0) -> None:
    """Switch a SQLite file to WAL. The switch takes an exclusive lock and SQLite answers another
    connection's switch on a fresh file with "database is locked" at once, without its busy timeout
    (two processes migrating a new database): retry until ``timeout_s``. Once the file is in WAL the
    pragma is a no-op that takes no lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor("expected the next_cursor of an earlier page") from exc


class HistoryStore:
    """Jobs, results and audit summaries in one relational database (``url``: any SQLAlchemy URL
    of SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = database_url(url)
        self.engine = make_engine(self.url)
        self._migrated = False
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    # --- schema ----------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply Alembic's migrations up to head, one process at a time (an advisory lock on
        PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite); a no-op once at head."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._connection(write=True) as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def _ensure(self) -> None:
        if self._migrated:
            return
        with self._lock:
            if not self._migrated:
                self.upgrade()
                self._migrated = True

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            yield connection.execution_options(history_write=write) if write else connection

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[Connection]:
        self._ensure()
        with self._connection(write) as connection, connection.begin():
            yield connection

    def _insert(self, connection: Connection, table: Any) -> Any:
        dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    # --- writes ----------------------------------------------------------------------------

    def record_queued(self, record: JobRecord) -> None:
        """Keep a job the gateway just queued; a row already there (its worker was quicker) wins."""
        with self._transaction(write=True) as connection:
            insert = self._insert(connection, JobRow).values(**_job_values(record))
            connection.execute(insert.on_conflict_do_nothing(index_elements=["id"]))

    def record_finished(self, record: JobRecord, result: dict[str, Any] | None = None,
                        audit: AuditSummary | None = None) -> None:
        """A job's final state with its result (and audit summary): all of it or none of it."""
        with self._transaction(write=True) as connection:
            values = _job_values(record)
            job = self._insert(connection, JobRow).values(**values)
            connection.execute(job.on_conflict_do_update(
                index_elements=["id"], set_={k: v for k, v in values.items() if k != "id"}))
            if result is not None:
                stored = self._insert(connection, ResultRow).values(job_id=record.id, result=result)
                connection.execute(stored.on_conflict_do_update(index_elements=["job_id"],
                                                                set_={"result": result}))
            if audit is not None:
                name, version = _split(record.model)
                summary = {"team": record.team, "model_name": name or "", "model_version": version,
                           "suite": audit.suite, "n": audit.n, "clean_accuracy": audit.clean_accuracy,
                           "robust_accuracy": audit.robust_accuracy, "verdict": audit.verdict,
                           "gate": audit.gate, "created_at": record.created_at}
                row = self._insert(connection, AuditRow).values(job_id=record.id, **summary)
                connection.execute(row.on_conflict_do_update(index_elements=["job_id"], set_=summary))

    def purge(self, job_ids: Iterable[str], ended_before: datetime) -> list[str]:
        """Delete those of ``job_ids`` that are finished (succeeded, failed, canceled) and ended
        before ``ended_before`` -- rows, results and audit summaries, in one transaction; the ids
        deleted, sorted. The condition is checked again here, so that a job that ran again since
        ``expired`` listed it stays."""
        wanted = sorted(set(job_ids))
        if not wanted:
            return []
        with self._transaction(write=True) as connection:
            query = select(JobRow.id).where(JobRow.id.in_(wanted), *_finished_before(ended_before))
            if connection.dialect.name == "postgresql":
                query = query.with_for_update()
            ids = sorted(row.id for row in connection.execute(query))
            if ids:
                connection.execute(delete(AuditRow).where(AuditRow.job_id.in_(ids)))
                connection.execute(delete(ResultRow).where(ResultRow.job_id.in_(ids)))
                connection.execute(delete(JobRow).where(JobRow.id.in_(ids)))
        return ids

    # --- reads -----------------------------------------------------------------------------

    def expired(self, ended_before: datetime, limit: int, skip: Iterable[str] = ()) -> list[str]:
        """The ids of at most ``limit`` finished jobs of any team that ended before
        ``ended_before``, oldest first, leaving out ``skip``: what the retention purge removes."""
        query = select(JobRow.id).where(*_finished_before(ended_before))
        skipped = sorted(set(skip))
        if skipped:
            query = query.where(JobRow.id.not_in(skipped))
        query = query.order_by(JobRow.ended_at, JobRow.id).limit(limit)
        with self._transaction() as connection:
            return [row.id for row in connection.execute(query)]

    def job(self, job_id: str, team: str) -> JobView | None:
        """A job of ``team`` with its result, or None (unknown, or another team's)."""
        query = (select(JobRow.__table__, ResultRow.result)
                 .outerjoin(ResultRow, ResultRow.job_id == JobRow.id)
                 .where(JobRow.id == job_id, JobRow.team == team))
        with self._transaction() as connection:
            found = connection.execute(query).first()
        return None if found is None else _view(found, found.result)

    def known_ids(self, job_ids: Iterable[str]) -> set[str]:
        """Which of ``job_ids`` the history holds, of any team (the orphan-blob sweep asks)."""
        wanted, known = sorted(set(job_ids)), set[str]()
        with self._transaction() as connection:
            for start in range(0, len(wanted), 500):  # bounded IN lists
                rows = connection.execute(select(JobRow.id).where(JobRow.id.in_(wanted[start:start + 500])))
                known.update(row.id for row in rows)
        return known

    def jobs(self, team: str, where: JobFilter, cursor: str | None = None, limit: int = 50
             ) -> tuple[list[JobView], str | None]:
        """``team``'s jobs, newest first, ``limit`` per page; the cursor of the next page or None.
        Keyset pagination on (created_at, id): a page never repeats or skips a job because others
        were inserted meanwhile."""
        query = select(JobRow.__table__).where(JobRow.team == team)
        for column, value in ((JobRow.kind, where.kind), (JobRow.model_name, where.model),
                              (JobRow.model_version, where.model_version),
                              (JobRow.status, where.status.value if where.status else None)):
            if value is not None:
                query = query.where(column == value)
        if where.created_before is not None:
            query = query.where(JobRow.created_at < where.created_before)
        if where.created_after is not None:
            query = query.where(JobRow.created_at > where.created_after)
        if cursor is not None:
            created, last_id = decode_cursor(cursor)
            query = query.where(or_(JobRow.created_at < created,
                                    and_(JobRow.created_at == created, JobRow.id < last_id)))
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        with self._transaction() as connection:
            rows = connection.execute(query).all()
        page = rows[:limit]
        more = len(rows) > limit
        return [_view(row, None) for row in page], (
            encode_cursor(page[-1].created_at, page[-1].id) if more and page else None)

    def audits(self, team: str, model: str) -> list[dict[str, Any]]:
        """``team``'s succeeded audits of any version of ``model``, newest first."""
        query = (select(AuditRow.__table__).where(AuditRow.team == team, AuditRow.model_name == model)
                 .order_by(AuditRow.created_at.desc(), AuditRow.job_id.desc()))
        with self._transaction() as connection:
            rows = connection.execute(query).all()
        return [{"id": row.job_id, "model": f"{row.model_name}@{row.model_version}"
                 if row.model_version is not None else row.model_name,
                 "version": row.model_version, "suite": row.suite, "created_at": _iso(row.created_at),
                 "n": row.n, "clean_accuracy": row.clean_accuracy,
                 "robust_accuracy": row.robust_accuracy, "verdict": row.verdict, "gate": row.gate}
                for row in rows]

    def audit_results(self, team: str, name: str, version: int, limit: int = 100) -> list[JobView]:
        """``team``'s succeeded audits of ``name@version`` with their results, newest first (at
        most ``limit``): the candidates for a baseline."""
        query = (select(JobRow.__table__, ResultRow.result)
                 .join(ResultRow, ResultRow.job_id == JobRow.id)
                 .where(JobRow.team == team, JobRow.kind == "audit", JobRow.model_name == name,
                        JobRow.model_version == version, JobRow.status == JobState.succeeded.value)
                 .order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit))
        with self._transaction() as connection:
            rows = connection.execute(query).all()
        return [_view(row, row.result) for row in rows]


def _finished_before(ended_before: datetime) -> tuple[Any, ...]:
    return (JobRow.status.in_([state.value for state in TERMINAL]), JobRow.ended_at.is_not(None),
            JobRow.ended_at < ended_before)


def _split(ref: str | None) -> tuple[str | None, int | None]:
    if ref is None:
        return None, None
    try:
        return parse_ref(ref)
    except ValueError:
        return ref, None


def _job_values(record: JobRecord) -> dict[str, Any]:
    name, version = _split(record.model)
    return {"id": record.id, "kind": record.kind, "team": record.team, "model_name": name,
            "model_version": version, "spec": record.spec, "status": record.status.value,
            "created_at": record.created_at, "started_at": record.started_at,
            "ended_at": record.ended_at, "attempts": record.attempts,
            "error_code": record.error.code if record.error else None,
            "error_message": record.error.message if record.error else None}


def _view(row: Any, result: dict[str, Any] | None) -> JobView:
    status = JobState(row.status)
    model = None
    if row.model_name is not None:
        model = f"{row.model_name}@{row.model_version}" if row.model_version is not None else row.model_name
    return JobView(
        id=row.id, kind=row.kind, status=status, progress=1.0 if status == JobState.succeeded else 0.0,
        model=model, created_at=_iso(row.created_at), started_at=_iso(row.started_at),
        ended_at=_iso(row.ended_at), result=result,
        error=JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None,
    )
