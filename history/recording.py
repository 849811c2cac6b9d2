"""From RQ jobs to history rows: the gateway records a job it queued, the worker records how it
ended. Audit chunks and predictions are not kept (an audit is its merge job; a prediction answers
in the request that made it)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import cache
from typing import Any

from rq.job import Job
from sqlalchemy.exc import SQLAlchemyError

from contracts.settings import CommonSettings
from contracts.specs import JobError, JobState
from history.store import AuditSummary, HistoryStore, JobRecord

log = logging.getLogger(__name__)
UNRECORDED_KINDS = frozenset({"predict", "audit-chunk"})


def kept(job: Job) -> bool:
    """Whether the history keeps ``job``: a job the gateway made for a team, of a kept kind."""
    return "team" in job.meta and job.meta.get("kind") not in UNRECORDED_KINDS


def job_record(job: Job, status: JobState, error: JobError | None = None) -> JobRecord:
    payload = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
    return JobRecord(
        id=job.id, kind=job.meta.get("kind", "unknown"), team=job.meta["team"],
        model=job.meta.get("model"), spec=payload, status=status,
        created_at=job.created_at or datetime.now(UTC), started_at=job.started_at,
        ended_at=datetime.now(UTC) if status != JobState.queued else None,
        attempts=(job.number_of_retries or 0) + (1 if job.started_at is not None else 0),
        error=error,
    )


def record_queued(store: HistoryStore, job: Job) -> None:
    """The gateway's half: the job as queued. A history outage does not refuse the job (the worker
    writes the whole row when it ends); it is logged."""
    if not kept(job):
        return
    try:
        store.record_queued(job_record(job, JobState.queued))
    except SQLAlchemyError:
        log.exception("%s: could not record the queued job in the history", job.id)


def record_canceled(store: HistoryStore, job: Job) -> None:
    """The gateway canceled a job before it ran: no worker will record its end."""
    if not kept(job):
        return
    try:
        store.record_finished(job_record(job, JobState.canceled,
                                         JobError(code="canceled", message="canceled by the client")))
    except SQLAlchemyError:
        log.exception("%s: could not record the canceled job in the history", job.id)


def audit_summary(result: dict[str, Any]) -> AuditSummary:
    """Per-eps robust accuracy with its 95% Wilson interval, the verdict and the gate lines."""
    from scipy.stats import binomtest

    n = int(result.get("n") or 0)
    robust: dict[str, dict[str, float | None]] = {}
    for key, value in (result.get("robust_accuracy") or {}).items():
        if value is None or n == 0:
            robust[key] = {"value": value, "low": None, "high": None}
            continue
        interval = binomtest(round(value * n), n).proportion_ci(confidence_level=0.95, method="wilson")
        robust[key] = {"value": value, "low": float(interval.low), "high": float(interval.high)}
    gate = result.get("gate")
    return AuditSummary(n=n, suite=result.get("suite"), clean_accuracy=result.get("clean_accuracy"),
                        robust_accuracy=robust, verdict=gate.get("verdict") if gate else None,
                        gate=gate.get("lines") if gate else None)


@cache
def worker_store(url: str) -> HistoryStore:
    return HistoryStore(url)


def record_finished(job: Job | None, result: dict[str, Any] | None = None) -> None:
    """The worker's half, called once by every job wrapper when its job ends: with the result when
    it succeeded, without (the error is in ``job.meta``) when it failed or was canceled. State,
    result and audit summary land in one transaction.

    A failure that RQ will retry is recorded as queued again. A history outage does not fail a
    job that worked (its result stays in Redis for ``result_ttl_s``); it is logged."""
    if job is None or not kept(job):
        return
    if result is not None:
        status, error = JobState.succeeded, None
    else:
        raw = job.meta.get("error") or {"code": "internal", "message": "the job raised"}
        error = JobError(code=raw["code"], message=raw["message"])
        status = JobState.canceled if error.code == "canceled" else JobState.failed
        if job.retries_left:
            status = JobState.queued
    audit = audit_summary(result) if result is not None and job.meta.get("kind") == "audit" else None
    try:
        worker_store(CommonSettings().history_database_url).record_finished(
            job_record(job, status, error), result, audit)
    except SQLAlchemyError:
        log.exception("%s: could not record the finished job in the history", job.id)
