"""The gateway's side of RQ: enqueue by string reference with the JSON serializer, read job
state, cancel. Maps RQ's statuses onto the five states users see, in one function."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Dependency, Job, JobStatus
from rq.serializers import JSONSerializer
from rq.worker import Worker

from contracts.errors import ALIVE_KEY, CANCEL_KEY
from contracts.settings import CommonSettings
from contracts.specs import JobError, JobState, JobView
from history.recording import record_canceled, record_queued
from history.store import HistoryStore
from service.limits import TeamLimits

log = logging.getLogger(__name__)
IDEMPOTENCY_KEY = "adversa:idem:{}:{}"
QUEUE_NAMES = ("predict", "attacks", "defenses", "audits")


@dataclass
class Queues:
    redis: Redis
    settings: CommonSettings
    history: HistoryStore | None = None
    limits: TeamLimits | None = None

    def admit(self, team: str, job_id: str, *, counted: bool = True) -> None:
        """Refuse (429) a submission over its team's job limits; see ``service.limits``."""
        if self.limits is not None:
            self.limits.admit(team, job_id, counted=counted)

    def release(self, team: str, job_id: str) -> None:
        """An admitted submission that was not queued after all. Redis failing here leaves the
        reservation to expire (``service.limits.RESERVATION_GRACE_S``) and the first error to tell."""
        if self.limits is not None:
            with contextlib.suppress(RedisError):
                self.limits.release(team, job_id)

    def queue(self, name: str) -> Queue:
        return Queue(self.settings.queue_name(name), connection=self.redis,
                     serializer=JSONSerializer)

    def enqueue(self, queue: str, func: str, payload: dict[str, Any], *, job_id: str,
                meta: dict[str, Any], timeout: int | None = None, result_ttl: int | None = None,
                depends_on: Dependency | None = None) -> Job:
        job = self.queue(queue).enqueue_call(
            func, args=(payload,), job_id=job_id, meta=meta,
            timeout=timeout or self.settings.job_timeout_s,
            result_ttl=result_ttl or self.settings.result_ttl_s,
            failure_ttl=self.settings.result_ttl_s, depends_on=depends_on,
        )
        if self.limits is not None and "team" in meta:
            try:
                self.limits.track(meta["team"], job.id)
            except RedisError as exc:  # the job is queued: it only waits uncounted
                log.warning("%s: not counted in its team's queue length: %s", job.id, exc)
        if self.history is not None:
            record_queued(self.history, job)
        return job

    def fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

    def workers_alive(self) -> int:
        names = {self.settings.queue_name(q) for q in QUEUE_NAMES}
        return sum(1 for w in Worker.all(connection=self.redis) if names & set(w.queue_names()))

    def depth(self) -> dict[str, int]:
        return {name: self.queue(name).count for name in QUEUE_NAMES}

    def cancel(self, job: Job) -> None:
        """Cancel a queued job at once; ask a running one to stop at its next chunk. An audit
        cancels its chunk jobs too."""
        for chunk_id in job.meta.get("chunks", []) if job.meta.get("kind") == "audit" else []:
            chunk = self.fetch(chunk_id)
            if chunk is not None and chunk.get_status() not in (JobStatus.FINISHED, JobStatus.FAILED):
                self.cancel(chunk)
        job.meta["cancel_requested"] = True
        job.save_meta()
        self.redis.set(CANCEL_KEY.format(job.id), 1, ex=self.settings.result_ttl_s)
        if job.get_status() in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            with contextlib.suppress(InvalidJobOperation):  # raced to a start: the flag stops it
                job.cancel()
                if self.history is not None:  # it never runs, so no worker records its end
                    record_canceled(self.history, job)

    def reserve_idempotency(self, team: str, key: str, job_id: str, body: bytes) -> str | None:
        """Claim ``key`` for ``job_id``. Returns None when claimed, else the stored
        ``job_id|digest`` of the earlier request."""
        digest = hashlib.sha256(body).hexdigest()
        name = IDEMPOTENCY_KEY.format(team, hashlib.sha256(key.encode()).hexdigest())
        if self.redis.set(name, f"{job_id}|{digest}", nx=True, ex=self.settings.result_ttl_s):
            return None
        stored = cast(bytes | str | None, self.redis.get(name))
        return stored.decode() if isinstance(stored, bytes) else stored

    def release_idempotency(self, team: str, key: str) -> None:
        self.redis.delete(IDEMPOTENCY_KEY.format(team, hashlib.sha256(key.encode()).hexdigest()))


def worker_lost(job: Job) -> bool:
    """A started job whose worker stopped sending heartbeats (killed, machine gone)."""
    name = job.worker_name
    return bool(name) and not job.connection.exists(ALIVE_KEY.format(name))


def state_of(job: Job) -> JobState:
    """RQ status (+ our meta and the worker's heartbeat) -> the state users see."""
    status = job.get_status(refresh=False)
    error = job.meta.get("error") or {}
    if status == JobStatus.STARTED and worker_lost(job):
        # A live worker's registry cleanup runs it again while retries last (workers/liveness.py);
        # until then it waits like any queued job. With none left it has failed for good.
        return JobState.queued if (job.retries_left or 0) > 0 else JobState.failed
    if status in (JobStatus.CANCELED, JobStatus.STOPPED) or error.get("code") == "canceled":
        return JobState.canceled
    if status == JobStatus.FINISHED:
        return JobState.succeeded
    if status == JobStatus.FAILED:
        return JobState.failed
    if status == JobStatus.STARTED:
        return JobState.running
    return JobState.queued


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def _audit_state(job: Job, state: JobState
                 ) -> tuple[JobState, float, dict[str, Any] | None, dict[str, str] | None]:
    """An audit is its merge job plus its chunk jobs: running as soon as a chunk runs, failed as
    soon as one fails, with the chunks' mean progress."""
    chunks = [c for c in (Job.fetch_many(job.meta.get("chunks", []), connection=job.connection,
                                          serializer=job.serializer)) if c is not None]
    states = [state_of(c) for c in chunks]
    done = sum(s == JobState.succeeded for s in states)
    progress = sum(1.0 if s == JobState.succeeded else float(c.meta.get("progress", 0.0))
                   for c, s in zip(chunks, states, strict=True))
    stage = {"chunks": len(job.meta.get("chunks", [])), "chunks_done": done,
             "chunks_running": sum(s == JobState.running for s in states)}
    error = None
    if state in (JobState.queued, JobState.running):
        for c, s in zip(chunks, states, strict=True):
            if s in (JobState.failed, JobState.canceled):
                state = s
                raw = c.meta.get("error") or {}
                error = {"code": raw.get("code", "worker-lost" if s == JobState.failed else "canceled"),
                         "message": f"chunk {c.meta.get('chunk')}: " + raw.get(
                             "message", "its worker stopped (killed or lost)" if s == JobState.failed
                             else "canceled")}
                break
        else:
            if any(s != JobState.queued for s in states):
                state = JobState.running
    fraction = 0.95 * progress / max(len(chunks), 1)
    return state, fraction, stage, error


def view(job: Job) -> JobView:
    job.refresh()
    state = state_of(job)
    audit = job.meta.get("kind") == "audit" and state not in (JobState.succeeded,)
    stage = job.meta.get("stage")
    audit_error = None
    if audit:
        state, audit_progress, stage, audit_error = _audit_state(job, state)
    error = None
    if state in (JobState.failed, JobState.canceled):
        raw = audit_error or job.meta.get("error")
        if raw:
            error = JobError(code=raw["code"], message=raw["message"])
        elif state == JobState.canceled:
            error = JobError(code="canceled", message="canceled by the client")
        elif job.get_status(refresh=False) == JobStatus.STARTED:
            error = JobError(code="worker-lost", message=f"worker {job.worker_name} stopped "
                             "sending heartbeats while running this job (killed or lost)")
        else:
            error = JobError(code="internal", message="the worker stopped without a result "
                             "(killed or timed out)")
    result = job.return_value() if state == JobState.succeeded else None
    progress = 1.0 if state == JobState.succeeded else float(job.meta.get("progress", 0.0))
    if audit:
        progress = audit_progress
    return JobView(
        id=job.id,
        kind=job.meta.get("kind", "unknown"),
        status=state,
        progress=progress,
        stage=stage,
        model=job.meta.get("model"),
        created_at=_iso(job.created_at),
        started_at=_iso(job.started_at),
        ended_at=_iso(job.ended_at),
        result=result,
        error=error,
    )
