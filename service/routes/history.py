"""The history database over HTTP: a team's jobs (``GET /v1/jobs``) and a model's audits across
versions (``GET /v1/models/{name}/audits``). Jobs still in Redis show their live state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, BeforeValidator, Field
from sqlalchemy.exc import SQLAlchemyError

from contracts.specs import JobError, JobState, JobView
from history.store import TERMINAL, HistoryStore, InvalidCursor, JobFilter
from service.deps import QueueDep, RegistryDep, TeamDep
from service.errors import RETRY_AFTER_S, Problem
from service.queueing import Queues, view

router = APIRouter(tags=["history"])
JobKind = Literal["attack", "audit", "defense", "generator", "registration"]


def get_history(request: Request) -> HistoryStore:
    return request.app.state.history  # type: ignore[no-any-return]


HistoryDep = Annotated[HistoryStore, Depends(get_history)]


def _iso_8601(value: Any) -> Any:
    """Only ISO 8601: pydantic would also take a bare number as Unix time, which the document
    (format date-time) does not promise and a typo would hit."""
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("expected an ISO 8601 date-time such as 2026-12-05T10:00:00Z") from None
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_8601)]


class JobPage(BaseModel):
    """One page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next (None: last)."""

    jobs: list[JobView]
    next_cursor: str | None = None


class RobustAccuracy(BaseModel):
    value: float | None
    low: float | None = Field(description="95% Wilson interval over the audit's n inputs")
    high: float | None


class AuditEntry(BaseModel):
    id: str
    model: str
    version: int | None
    suite: str | None
    created_at: str | None
    n: int
    clean_accuracy: float | None
    robust_accuracy: dict[str, RobustAccuracy] = Field(description="by 'norm:eps', as in the audit result")
    verdict: str | None = Field(description="the gate's pass/fail; None without a gate")
    gate: list[dict[str, Any]] | None


class AuditHistory(BaseModel):
    model: str
    audits: list[AuditEntry]


@contextmanager
def _database() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise Problem(503, f"the history database is unavailable ({type(exc).__name__}); retry in "
                           f"{RETRY_AFTER_S} s", code="history-unavailable",
                      headers={"Retry-After": str(RETRY_AFTER_S)}) from exc


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _lost(job: JobView) -> JobView:
    """A job the history holds as unfinished but the queue no longer has can never end."""
    if job.status in TERMINAL:
        return job
    return job.model_copy(update={"status": JobState.failed, "error": JobError(
        code="lost", message="the queue no longer holds this job and it never reported an end "
                             "(its worker was killed, or Redis lost its keys)")})


def recorded_view(queues: Queues, history: HistoryStore, job_id: str, team: str) -> JobView | None:
    """A job of ``team`` that Redis no longer holds (its keys expired or were flushed), as the
    history recorded it; None when Redis still has it or nobody recorded it."""
    if not job_id.isalnum() or queues.fetch(job_id) is not None:
        return None
    with _database():
        job = history.job(job_id, team)
    return None if job is None else _lost(job)


@router.get("/v1/jobs", response_model=JobPage)
def list_jobs(
    team: TeamDep, queues: QueueDep, history: HistoryDep,
    kind: JobKind | None = None,
    model: Annotated[str | None, Query(max_length=256, description="model name, any version")] = None,
    model_version: Annotated[int | None, Query(ge=1)] = None,
    status: JobState | None = None,
    created_before: Annotated[IsoDateTime | None, Query(description="ISO 8601; UTC if no zone")] = None,
    created_after: Annotated[IsoDateTime | None, Query(description="ISO 8601; UTC if no zone")] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Your team's jobs from the history database, newest first, filtered, a page at a time.
    Results are left out (``GET /v1/jobs/{id}`` has them); jobs not yet finished show their
    live status and progress (``failed``, code ``lost``, once the queue no longer has them). The
    ``status`` filter applies to the recorded status."""
    where = JobFilter(kind=kind, model=model, model_version=model_version, status=status,
                      created_before=_utc(created_before), created_after=_utc(created_after))
    try:
        with _database():
            jobs, next_cursor = history.jobs(team, where, cursor, limit)
    except InvalidCursor as exc:
        raise Problem(422, f"cursor: {exc}, got {cursor!r}", field="cursor", code="invalid-cursor") from None
    live = []
    for job in jobs:
        if job.status in TERMINAL:
            live.append(job)
            continue
        rq_job = queues.fetch(job.id)
        live.append(_lost(job) if rq_job is None else view(rq_job).model_copy(update={"result": None}))
    return JobPage(jobs=live, next_cursor=next_cursor)


@router.get("/v1/models/{name}/audits", response_model=AuditHistory, tags=["models"])
def model_audits(name: str, team: TeamDep, history: HistoryDep, index: RegistryDep) -> AuditHistory:
    """Your team's succeeded audits of every version of model ``name``, newest first: per-eps
    robust accuracy with intervals, verdict and gate lines."""
    if "@" in name:
        raise Problem(422, f"name: expected a model name without @version (the history covers every "
                           f"version), got {name!r}", field="name", code="invalid-input")
    with _database():
        audits = history.audits(team, name)
    card = index.card(name)
    if not audits and (card is None or (card.team is not None and card.team != team)):
        raise Problem(404, f"expected the name of a model you can see (GET /v1/models), got {name!r}",
                      field="name", code="unknown-model")
    return AuditHistory(model=name, audits=[AuditEntry.model_validate(a) for a in audits])
