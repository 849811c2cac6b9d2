"""A history for the web-page tests and bench: audits of several versions of a model (with their
reports in the blob store) and plain jobs, recorded as the worker records them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import models
from history.recording import audit_summary
from history.store import HistoryStore, JobRecord
from models.store import BlobStore
from workers.audit.report import render_report
from workers.specs import JobError, JobState

EPS = {"linf": ["1/255", "2/255", "4/255", "8/255", "0.05", "0.1", "0.2", "0.3"]}
START = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def audit_result(model: str, version: int, n: int = 200, verdict: str | None = "pass") -> dict[str, Any]:
    """An audit result as the merge makes it: each version more robust than the one before."""
    from contracts.gate import parse_eps

    eps = [parse_eps(label) for label in EPS["linf"]]
    clean = 0.90 - 0.01 * version
    slope = max(0.6, 1.8 - 0.3 * version)
    worst = [min(clean, max(0.0, clean - slope * e - 0.05 * (e > 0.1))) for e in eps]
    curve = {"eps": eps, "labels": EPS["linf"], "worst_case": worst,
             "attacks": {"fgsm": [min(clean, w + 0.1) for w in worst], "apgd-ce": worst}}
    lines = [{"expression": "robust_accuracy@linf:0.1 >= 0.5", "metric": "robust_accuracy",
              "value": worst[5], "passed": verdict == "pass", "detail": ""}]
    return {"model": f"{model}@{version}", "suite": "quick", "n": n, "seed": 0, "clean_accuracy": clean,
            "curves": {"linf": curve},
            "robust_accuracy": {f"linf:{label}": w for label, w in zip(EPS["linf"], worst, strict=True)},
            "gate": {"verdict": verdict, "lines": lines} if verdict else None,
            "artifacts": ["report.html", "audit.json"]}


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
