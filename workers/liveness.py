"""Workers that stay known to be alive, and jobs that outlive the worker that ran them.

RQ already has the machinery: every execution sits in the queue's ``StartedJobRegistry`` with an
expiry that heartbeats push forward; ``StartedJobRegistry.cleanup`` treats an expired entry as an
abandoned job and retries it while its ``retries_left`` lasts, else fails it. Two things stop it
from working with ``SimpleWorker``: its heartbeat TTL is the job timeout plus a minute (an hour by
default), and it beats only between jobs. ``HeartbeatWorker`` keeps the TTL at
``heartbeat_ttl_s``, beats from a thread while a job runs, cleans the started registries from that
thread too (so a dead worker's job is requeued while every other worker is busy), and gives every
job ``job_retries`` retries for a lost worker only: a job that raises fails at once (kernels are
deterministic, a second run would raise again).

SIGTERM drains: the job stops at its next chunk boundary (``Drained``, raised by the job's cancel
check) and goes back to the front of its queue without spending a retry; a job without chunk
checks finishes. Which workers are alive, as the gateway reads it, is ``contracts.liveness``.
"""

from __future__ import annotations

import json
import logging
import threading
from types import FrameType, TracebackType
from typing import Any, cast

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.registry import clean_registries
from rq.worker import Worker

from contracts import telemetry
from contracts.errors import ALIVE_KEY, JobFailure
from history.recording import record_finished

log = logging.getLogger(__name__)

# Set on SIGTERM/SIGINT: running jobs stop at their next chunk and are requeued.
DRAINING = threading.Event()
CLEANUP_KEY = "adversa:cleanup:{}"
AUDIT_FAILED_KEY = "adversa:audit-failed:{}"


class Drained(BaseException):  # noqa: N818 - not an error: the job is requeued, nothing is recorded
    """The worker is shutting down; the job goes back to its queue at this chunk boundary."""


def check_draining() -> None:
    if DRAINING.is_set():
        raise Drained("the worker is shutting down")


def fail_audit(connection: Redis, job: Job, error: dict[str, str], ttl_s: int) -> None:
    """A chunk of an audit failed for good: record why, so that its other chunks stop (at their start
    or next stage) instead of running for an audit that is already reported failed."""
    audit_id = job.meta.get("audit")
    if job.meta.get("kind") != "audit-chunk" or not audit_id:
        return
    reason = {"code": error["code"], "message": f"chunk {job.meta.get('chunk')} failed: {error['message']}"}
    connection.set(AUDIT_FAILED_KEY.format(audit_id), json.dumps(reason), nx=True, ex=ttl_s)


def check_audit(connection: Redis, audit_id: str) -> None:
    """Raise the failure of another chunk of ``audit_id``, if one failed."""
    raw = connection.get(AUDIT_FAILED_KEY.format(audit_id))
    if raw is not None:
        reason = json.loads(cast(bytes, raw))
        raise JobFailure(f"audit stopped: {reason['message']}", reason["code"])


class HeartbeatWorker(SimpleWorker):
    """``SimpleWorker`` whose liveness is a heartbeat of ``heartbeat_ttl`` seconds, kept while jobs
    run, whose dead peers' jobs are run again (``retries`` times), and which drains on SIGTERM."""

    def __init__(self, queues: list[Queue], *, heartbeat_ttl: int, retries: int, result_ttl: int,
                 queue_prefix: str = "", **kwargs: Any) -> None:
        super().__init__(queues, worker_ttl=heartbeat_ttl, **kwargs)
        self.metrics_key = telemetry.metrics_key(queue_prefix)
        self.heartbeat_ttl = heartbeat_ttl
        self.retries = retries
        self.result_ttl = result_ttl
        self.beat_every = max(1.0, heartbeat_ttl / 5)
        self._drained: set[str] = set()
        self._stop_beating = threading.Event()
        self.push_exc_handler(self._on_abandoned)

    # --- liveness ------------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # RQ asks for the job timeout plus a minute while a job runs: a killed worker would look
        # alive (and keep its name) that long. The beat thread keeps the short TTL fresh instead.
        super().heartbeat(self.heartbeat_ttl, pipeline=pipeline)

    def beat(self) -> None:
        """One heartbeat for the worker, its running execution and the gateway's liveness key."""
        with self.connection.pipeline() as pipeline:
            self.heartbeat(pipeline=pipeline)
            for execution in list(self.executions.values()):
                execution.heartbeat(execution.job.started_job_registry, self.heartbeat_ttl, pipeline)
            # The gateway reports a started job as lost once this key is gone; it outlives the
            # registry entry so that a live peer requeues the job before that.
            pipeline.set(ALIVE_KEY.format(self.name), 1, ex=2 * self.heartbeat_ttl)
            pipeline.execute()

    def clean_registries(self) -> None:
        """RQ's registry maintenance (abandoned jobs retried or failed), at most once per beat
        interval per queue across all workers; the lock expires rather than being released, so a
        worker killed while holding it blocks nobody for long."""
        for queue in self.queues:
            if self.connection.set(CLEANUP_KEY.format(queue.name), self.name, nx=True,
                                   ex=max(1, int(self.beat_every))):
                clean_registries(queue, self._exc_handlers)

    def subscribe(self) -> None:
        """RQ's command channel, read in one-second waits: RQ's own reads wait up to a minute, and
        its shutdown joins that thread, so every stop (and every drain under ``serve``) took a
        minute."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler)

    def register_birth(self) -> None:
        super().register_birth()
        self.beat()  # the gateway's liveness key exists before the first job starts
        self._stop_beating.clear()
        threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True).start()

    def register_death(self) -> None:
        self._stop_beating.set()
        super().register_death()

    def _beat_loop(self) -> None:
        while not self._stop_beating.wait(self.beat_every):
            try:
                self.beat()
                self.clean_registries()
            except RedisError as exc:
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)

    def _on_abandoned(self, job: Job, exc_type: type[BaseException] | None, exc: BaseException | None,
                      tb: TracebackType | None) -> bool:
        """Exception handler that RQ's registry cleanup calls for a job whose worker stopped
        beating, before it retries or fails it: say so, in the log or in the job's error."""
        if exc_type is not AbandonedJobError:
            return True
        attempts = int(job.meta.get("attempts", 1))
        if job.retries_left:
            log.warning("%s: worker %s lost on attempt %d; running it again (%d retries left)",
                        job.id, job.worker_name, attempts, job.retries_left)
            telemetry.record_retry(self.connection, self.metrics_key, job)
            return True
        error = {"code": "worker-lost",
                 "message": f"the worker running it ({job.worker_name}) stopped sending heartbeats (killed "
                            f"or lost) on attempt {attempts} of {attempts}; no retries left"}
        log.error("%s: %s", job.id, error["message"])
        job.meta["error"] = error
        job.save_meta()
        fail_audit(self.connection, job, error, self.result_ttl)
        record_finished(job)
        telemetry.record_end(self.connection, self.metrics_key, job, "worker-lost",
                             telemetry.seconds_since_start(job))
        return True

    # --- retries and draining -------------------------------------------------------------------

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        if job.retries_left is None:  # first run: retries are for a lost worker (see module doc)
            job.retries_left = self.retries
        job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
        if job.meta["attempts"] > 1:
            job.meta["progress"] = 0.0
            log.info("%s: attempt %d", job.id, job.meta["attempts"])
        # Stored before RQ marks the job started: a worker killed in between the two used to leave
        # a started job without retries, which the registry cleanup then failed at once.
        self.connection.hset(job.key, "retries_left", str(job.retries_left))
        job.save_meta()
        super().prepare_job_execution(job, remove_from_intermediate_queue)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: take no new job, and requeue the running one at its next chunk."""
        log.info("worker %s: signal %d: draining", self.name, signum)
        DRAINING.set()
        super().request_stop(signum, frame)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        if exc_info and exc_info[0] is Drained:
            self._drained.add(job.id)
            return
        super().handle_exception(job, *exc_info)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None,
                           exc_string: str = "", execution: Any = None) -> None:
        if job.id in self._drained:
            self._drained.discard(job.id)
            self._requeue(job, queue, execution)
            return
        job.retries_left = 0  # it raised: running it again would raise again
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def _requeue(self, job: Job, queue: Queue, execution: Any) -> None:
        job.meta["attempts"] = max(0, int(job.meta.get("attempts", 1)) - 1)  # a drain is no attempt
        job.ended_at = None
        # Queued first: a worker that dies in between leaves a registry entry that the cleanup
        # skips (the job is no longer started), never a started job that nobody requeues.
        queue.enqueue_job(job, at_front=True)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        log.info("%s: requeued (worker %s shutting down)", job.id, self.name)


def wait_for_name(connection: Redis, name: str, heartbeat_ttl_s: int) -> None:
    """Wait until no live worker holds ``name``: a killed worker's key lasts at most one heartbeat
    TTL; a key that outlives that is a worker that still beats."""
    key = Worker.redis_worker_namespace_prefix + name
    stop = threading.Event()
    for _ in range(int(2 * heartbeat_ttl_s) + 2):
        if not connection.exists(key) or connection.hexists(key, "death"):
            return
        stop.wait(1.0)
    raise SystemExit(f"a worker named {name!r} is alive (its heartbeat is fresh); choose another --name")
