"""Accepting a job once: the ``Idempotency-Key`` handshake around an enqueue, shared by the routes
that create jobs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fastapi import Request, Response
from rq.job import Job

from service.errors import Problem
from service.metrics import JOBS
from service.queueing import Queues, view
from workers.specs import JobView


def accept(request: Request, response: Response, queues: Queues, team: str, kind: str, job_id: str,
           digest: bytes, enqueue: Callable[[], Job]) -> JobView:
    """Run ``enqueue`` (store inputs, put the job on its queue) unless a request with the same
    ``Idempotency-Key`` came before: then answer that job (409 if the body differs). A failed
    enqueue releases the key, so the client's retry is accepted."""
    idem = request.headers.get("idempotency-key")
    if idem:
        earlier = queues.reserve_idempotency(team, idem, job_id, digest)
        if earlier is not None:
            return _replay(earlier, digest, queues, response)
    try:
        rq_job = enqueue()
    except BaseException:
        if idem:
            queues.release_idempotency(team, idem)
        raise
    JOBS.labels(kind).inc()
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return view(rq_job)


def _replay(earlier: str, digest: bytes, queues: Queues, response: Response) -> JobView:
    job_id, _, stored_digest = earlier.partition("|")
    if stored_digest != hashlib.sha256(digest).hexdigest():
        raise Problem(409, "Idempotency-Key was already used with a different request",
                      field="Idempotency-Key", code="idempotency-conflict")
    existing = queues.fetch(job_id)
    if existing is None:
        raise Problem(409, "a request with this Idempotency-Key is still being accepted; retry",
                      field="Idempotency-Key", code="idempotency-in-progress")
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    response.headers["Idempotent-Replayed"] = "true"
    return view(existing)
