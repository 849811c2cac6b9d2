"""Accepting a job once: the ``Idempotency-Key`` handshake around an enqueue, and the digest that
tells a retry of a request from a different request, shared by every route that creates jobs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel
from rq.job import Job

from contracts.specs import JobView
from service.errors import Problem
from service.metrics import JOBS
from service.queueing import Queues, view


def request_digest(validated: BaseModel, files: Sequence[tuple[str, bytes]] = (),
                   form: Mapping[str, Any] | None = None) -> bytes:
    """What an ``Idempotency-Key`` is bound to: canonical JSON (sorted keys, no whitespace) of the
    validated request and of any other form fields it came with (already parsed), then, for
    multipart, each uploaded file's name, length and sha256 in order.

    Taken after validation, not from the raw body, so that the same request always gives the same
    digest (whitespace, key order, a default written out or left implicit) whether it came as JSON
    or multipart; each file described on its own, so that the same bytes split differently across
    files (different inputs) give a different one.
    """
    canonical = {
        "request": validated.model_dump(mode="json"),
        "form": dict(form or {}),
        "files": [{"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for name, data in files],
    }
    return json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()


def accept(request: Request, response: Response, queues: Queues, team: str, kind: str, job_id: str,
           digest: bytes, enqueue: Callable[[], Job]) -> JobView:
    """Run ``enqueue`` (store inputs, put the job on its queue) unless a request with the same
    ``Idempotency-Key`` came before: then answer that job (409 if the body differs), or the team
    is at one of its job limits (429). A failed enqueue releases the key and the team's place, so
    the client's retry is accepted."""
    idem = request.headers.get("idempotency-key")
    if idem:
        earlier = queues.reserve_idempotency(team, idem, job_id, digest)
        if earlier is not None:
            return _replay(earlier, digest, queues, response)
    admitted = False
    try:
        queues.admit(team, job_id)  # 429 over the team's job limits (service/limits.py)
        admitted = True
        rq_job = enqueue()
    except BaseException:
        if admitted:
            queues.release(team, job_id)
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
