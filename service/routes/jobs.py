"""Job status, artifacts and cancellation."""

from __future__ import annotations

from fastapi import APIRouter, Response
from rq.job import Job

from contracts.specs import JobState, JobView
from models.store import BlobNotFoundError
from service.deps import JobIdPath, QueueDep, StoreDep, TeamDep
from service.errors import Problem
from service.queueing import Queues, view
from service.routes.history import HistoryDep, recorded_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MEDIA_TYPES = {
    ".npy": "application/octet-stream",
    ".png": "image/png",
    ".csv": "text/csv; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
}


def _owned(queues: Queues, job_id: str, team: str) -> Job:
    job = queues.fetch(job_id) if job_id.isalnum() else None
    if job is None or job.meta.get("team") != team:
        raise Problem(404, f"expected the id of one of your jobs, got {job_id!r}",
                      field="id", code="unknown-job")
    return job


@router.get("/{job_id}", response_model=JobView)
def get_job(job_id: JobIdPath, queues: QueueDep, history: HistoryDep, team: TeamDep) -> JobView:
    """Status, progress, and the result summary or error (from the history database once Redis
    no longer holds the job)."""
    return recorded_view(queues, history, job_id, team) or view(_owned(queues, job_id, team))


@router.get("/{job_id}/artifacts/{name}", response_class=Response,
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}})
def get_artifact(job_id: JobIdPath, name: str, queues: QueueDep, store: StoreDep, history: HistoryDep,
                 team: TeamDep) -> Response:
    """One artifact of a succeeded job (``adversarial.npy``, ``grid.png``, ``samples.csv``)."""
    job_view = recorded_view(queues, history, job_id, team) or view(_owned(queues, job_id, team))
    available = (job_view.result or {}).get("artifacts", [])
    if job_view.status != JobState.succeeded:
        raise Problem(409, f"job is {job_view.status.value}; artifacts exist once it succeeded",
                      code="job-not-finished")
    if name not in available:
        raise Problem(404, f"expected one of {available}, got {name!r}", field="name",
                      code="unknown-artifact")
    try:
        data = store.get(f"jobs/{job_id}/{name}")
    except BlobNotFoundError:
        raise Problem(404, f"artifact {name!r} is no longer stored", code="artifact-gone") from None
    suffix = name[name.rfind("."):]
    return Response(data, media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.delete("/{job_id}", status_code=202, response_model=JobView)
def cancel_job(job_id: JobIdPath, queues: QueueDep, team: TeamDep) -> JobView:
    """Cancel: a queued job never runs; a running one stops at its next chunk."""
    job = _owned(queues, job_id, team)
    state = view(job).status
    if state in (JobState.succeeded, JobState.failed):
        raise Problem(409, f"job already {state.value}; nothing to cancel", code="job-finished")
    if state != JobState.canceled:
        queues.cancel(job)
    return view(job)
