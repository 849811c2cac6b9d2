"""A history for the web-page tests and bench: audits of several versions of a model (real merge
output, with their reports in the blob store) and plain jobs, recorded as the worker records them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import models
from history.recording import audit_summary
from history.store import HistoryStore, JobRecord
from models.store import BlobStore
from tests.unit.real_audits import history_audit
from workers.audit.report import render_report
from workers.specs import JobError, JobState

START = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def audit_result(model: str, version: int, verdict: str | None = "pass") -> dict[str, Any]:
    """A real audit's result (the quick Linf audit of a tiny model through the gateway's checks, the
    chunk jobs and the merge, see ``tests.unit.real_audits.history_audit``), filed as ``model`` at
    ``version``: each version's on other inputs, so the versions' curves differ; its gate passes,
    fails, or is absent (``verdict`` None)."""
    result = history_audit(version % 3, verdict).result
    assert result["gate"] is None if verdict is None else result["gate"]["verdict"] == verdict
    return {**result, "model": f"{model}@{version}"}


def record_audit(history: HistoryStore, store: BlobStore, job_id: str, team: str, model: str, version: int,
                 created: datetime, verdict: str | None = "pass") -> dict[str, Any]:
    result = audit_result(model, version, verdict=verdict)
    store.put(f"jobs/{job_id}/report.html", render_report(result, None, []).encode())
    record = JobRecord(id=job_id, kind="audit", team=team, model=f"{model}@{version}", spec={},
                       status=JobState.succeeded, created_at=created, started_at=created,
                       ended_at=created + timedelta(seconds=30), attempts=1)
    history.record_finished(record, result, audit_summary(result))
    return result


def record_job(history: HistoryStore, job_id: str, team: str, model: str, created: datetime,
               status: JobState = JobState.succeeded, kind: str = "attack") -> None:
    error = JobError(code="oom", message="out of memory") if status == JobState.failed else None
    record = JobRecord(id=job_id, kind=kind, team=team, model=model, spec={"seed": 0}, status=status,
                       created_at=created, started_at=created, ended_at=created + timedelta(seconds=3),
                       attempts=1, error=error)
    result = {"scores": {"n": 4, "robust_accuracy": 0.5}, "artifacts": []} if status == JobState.succeeded \
        else None
    history.record_finished(record, result)


def register_cards(models_root: Path, team: str, name: str, versions: int) -> None:
    """Cards of ``name`` v1..``versions`` owned by ``team`` (the hosted fmnist-cnn's, renamed): what a
    registration leaves in the registry, enough for listings (there are no weights to load)."""
    source = Path(models.__file__).parent / "hosted" / "fmnist-cnn" / "1" / "card.json"
    hosted = json.loads(source.read_text())
    for version in range(1, versions + 1):
        folder = models_root / name / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        card = {**hosted, "name": name, "version": version, "team": team}
        (folder / "card.json").write_text(json.dumps(card))


def fill(history: HistoryStore, store: BlobStore, team: str, jobs: int, model: str = "fmnist-cnn",
         versions: int = 3, audits_per_version: int = 1) -> list[str]:
    """``jobs`` jobs of ``team``, oldest first: ``versions x audits_per_version`` audits of ``model``
    (reports stored), the rest attacks (every tenth failed). Their ids, oldest first."""
    ids = []
    audits = [(v, a) for v in range(1, versions + 1) for a in range(audits_per_version)]
    every = max(1, jobs // max(1, len(audits)))
    for i in range(jobs):
        created = START + timedelta(minutes=i)
        job_id = f"{team.replace('-', '')}{i:05d}"
        if audits and i % every == 0:
            version, _ = audits.pop(0)
            record_audit(history, store, job_id, team, model, version, created)
        else:
            record_job(history, job_id, team, f"{model}@1", created,
                       JobState.failed if i % 10 == 9 else JobState.succeeded)
        ids.append(job_id)
    return ids
