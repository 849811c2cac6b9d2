"""The history tables. Times are stored as naive UTC (SQLite keeps no zone) and come back aware."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, stored as naive UTC, aware UTC out."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """One job as users see it (audit chunks and predictions are not kept)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    team: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str | None] = mapped_column(String(256))
    model_version: Mapped[int | None] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_jobs_team_created", "team", "created_at", "id"),
                      Index("ix_jobs_ended", "ended_at"))  # the retention purge's scan


class ResultRow(Base):
    """A succeeded job's result (the JSON ``GET /v1/jobs/{id}`` shows)."""

    __tablename__ = "results"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSONType)


class AuditRow(Base):
    """What one succeeded audit says, kept to compare a model's versions: ``robust_accuracy`` maps
    ``norm:eps`` to ``{"value", "low", "high"}`` (95% Wilson interval over ``n`` inputs), ``gate``
    holds the evaluated gate lines (None without a gate)."""

    __tablename__ = "audits"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    team: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[int | None] = mapped_column(Integer)
    suite: Mapped[str | None] = mapped_column(String(32))
    n: Mapped[int] = mapped_column(Integer)
    clean_accuracy: Mapped[float | None] = mapped_column(Float)
    robust_accuracy: Mapped[dict[str, Any]] = mapped_column(JSONType)
    verdict: Mapped[str | None] = mapped_column(String(16))
    gate: Mapped[list[Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_audits_team_model", "team", "model_name", "created_at"),)
