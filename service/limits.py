"""Limits per team, answered with 429 and ``Retry-After``.

- Request rate (``rate_limit``): the ``limits`` library's moving window on Redis, so that every
  gateway process shares one count per team. Checked when a route resolves the caller's team.
- Active jobs (``max_active_jobs_per_team``): a team's submissions queued or running; an audit is
  one (its merge job stands for it), predictions are not counted.
- Queued entries (``max_queued_jobs_per_team``): what a team has waiting on the queues (every audit
  chunk and prediction is one); a submission is refused while that many wait.

Nothing here is a counter that a lost decrement could leak: each team has two Redis sorted sets of
job ids, and an admission that finds a set full first drops the ids whose RQ job has ended
(finished, failed, canceled, stopped, expired, or started on a worker that stopped beating with no
retries left) and looks again, so the count is re-derived from the jobs' own state whatever way
they ended. Ended ids can only over-count, so below the limit no pruning is needed: an admission
is one script call, and the sets never hold more than a limit's worth (plus one audit's chunks).
The check and the reservation of the new id happen in one Lua script: two gateways cannot both
take the last place.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import Counter
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from contracts.errors import ALIVE_KEY
from service.errors import Problem
from service.settings import Settings

log = logging.getLogger(__name__)
LIMITED = Counter("adversa_limited_total", "Requests refused by a team limit (429), by limit: rate, "
                  "active-jobs, queued-jobs", ["limit"])

# What a client is told to wait after a job limit: there is no reset time to quote (a job ends when
# it ends); half a minute is short next to a job and long next to a request.
JOB_LIMIT_RETRY_AFTER_S = 30
# An id reserved by an admission has no RQ job until the route's enqueue (which may first store
# inputs of up to a model's size) has run; a missing job is taken as ended only after this long.
RESERVATION_GRACE_S = 600
ENDED = frozenset({"finished", "failed", "canceled", "stopped"})
WAITING = frozenset({"queued", "deferred", "scheduled"})

# KEYS: active set, queued set. ARGV: max active, max queued, job id, now, counted (1/0), ttl.
# Returns 0 (admitted; the id is reserved in the active set when counted), 1 (active limit),
# 2 (queued limit).
ADMIT = """
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 2 end
if ARGV[5] == '1' then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 1 end
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
return 0
"""


@dataclass
class TeamLimits:
    """The limits of ``settings`` on ``redis`` (the gateway's connection pool)."""

    redis: Redis
    settings: Settings
    rates: list[RateLimitItem] = field(init=False)
    limiter: MovingWindowRateLimiter | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.rates = parse_many(self.settings.rate_limit) if self.settings.rate_limit else []
        if self.rates:
            storage = RedisStorage("redis://", connection_pool=self.redis.connection_pool,
                                   key_prefix=f"adversa:{self.settings.queue_prefix}rate")
            self.limiter = MovingWindowRateLimiter(storage)
        self._admit = self.redis.register_script(ADMIT)

    # --- request rate -----------------------------------------------------------------------

    def check_rate(self, team: str) -> None:
        """Count one request of ``team``; 429 once over ``rate_limit``. Fails open when Redis does
        not answer: the routes that need Redis answer 503 themselves, the others keep working."""
        if self.limiter is None:
            return
        try:
            for item in self.rates:
                if not self.limiter.hit(item, team):
                    reset = self.limiter.get_window_stats(item, team).reset_time
                    wait = max(1, math.ceil(reset - time.time()))
                    LIMITED.labels("rate").inc()
                    raise Problem(429, f"rate limit: team {team!r} is over {item} "
                                       f"(ADVERSA_RATE_LIMIT={self.settings.rate_limit!r}); "
                                       f"retry in {wait} s", code="rate-limited",
                                  headers={"Retry-After": str(wait)})
        except RedisError as exc:
            log.warning("rate limit of team %s not checked: Redis failed: %s", team, exc)

    # --- jobs --------------------------------------------------------------------------------

    def _key(self, team: str, which: str) -> str:
        return f"adversa:{self.settings.queue_prefix}team:{team}:{which}"

    def admit(self, team: str, job_id: str, *, counted: bool = True) -> None:
        """Admit a submission of ``team`` (its top job ``job_id``) or raise 429. ``counted``: it
        counts towards the active jobs (everything but predictions); its id is then reserved until
        its job ends, or ``release`` gives it back."""
        active, queued = self._key(team, "active"), self._key(team, "queued")
        args: list[str | int | float] = [
            self.settings.max_active_jobs_per_team, self.settings.max_queued_jobs_per_team, job_id,
            time.time(), int(counted), self.settings.result_ttl_s]
        refused = self._admit(keys=[active, queued], args=args)
        if refused:  # ids of ended jobs only ever over-count: drop them once a set looks full
            self._prune(active, waiting=False)
            self._prune(queued, waiting=True)
            refused = self._admit(keys=[active, queued], args=args)
        if refused:
            LIMITED.labels("active-jobs" if refused == 1 else "queued-jobs").inc()
        if refused == 1:
            limit = self.settings.max_active_jobs_per_team
            raise self._refusal(f"active jobs: team {team!r} has {limit} jobs queued or running, its "
                                f"limit (ADVERSA_MAX_ACTIVE_JOBS_PER_TEAM={limit}); retry when one ends, "
                                "or cancel one (DELETE /v1/jobs/{id})", "too-many-jobs")
        if refused == 2:
            limit = self.settings.max_queued_jobs_per_team
            raise self._refusal(f"queue length: team {team!r} has {limit} jobs waiting on the queues, its "
                                f"limit (ADVERSA_MAX_QUEUED_JOBS_PER_TEAM={limit}); retry when some have "
                                "started", "queue-full")

    def release(self, team: str, job_id: str) -> None:
        """Give back the reservation of a submission that was not queued after all."""
        self.redis.zrem(self._key(team, "active"), job_id)

    def track(self, team: str, job_id: str) -> None:
        """Note a job just put on a queue (any job: chunk, merge, prediction) as waiting."""
        key = self._key(team, "queued")
        with self.redis.pipeline() as pipeline:
            pipeline.zadd(key, {job_id: time.time()})
            pipeline.expire(key, self.settings.result_ttl_s)
            pipeline.execute()

    def counts(self, team: str) -> tuple[int, int]:
        """(active, queued) of ``team``, pruned."""
        active, queued = self._key(team, "active"), self._key(team, "queued")
        self._prune(active, waiting=False)
        self._prune(queued, waiting=True)
        return int(cast(int, self.redis.zcard(active))), int(cast(int, self.redis.zcard(queued)))

    def _refusal(self, detail: str, code: str) -> Problem:
        return Problem(429, detail, code=code, headers={"Retry-After": str(JOB_LIMIT_RETRY_AFTER_S)})

    def _prune(self, key: str, *, waiting: bool) -> None:
        """Drop the ids of ``key`` whose job has ended (``waiting``: whose job is no longer waiting),
        read from the jobs' own RQ hashes."""
        members = [(_text(job_id), float(added)) for job_id, added in
                   cast(list[tuple[Any, Any]], self.redis.zrange(key, 0, -1, withscores=True))]
        if not members:
            return
        with self.redis.pipeline(transaction=False) as pipeline:
            for job_id, _ in members:
                pipeline.hmget(Job.key_for(job_id), ["status", "worker_name", "retries_left"])
            rows = [[None if v is None else _text(v) for v in row] for row in pipeline.execute()]
        workers = sorted({str(row[1]) for row in rows if row[0] == "started" and row[1]})
        with self.redis.pipeline(transaction=False) as pipeline:
            for name in workers:
                pipeline.exists(ALIVE_KEY.format(name))
            alive = {w for w, up in zip(workers, pipeline.execute(), strict=True) if up}
        now = time.time()
        gone = []
        for (job_id, added), (status, worker, retries) in zip(members, rows, strict=True):
            if status is None:
                ended = now - added > RESERVATION_GRACE_S
            elif waiting:
                ended = status not in WAITING
            else:  # a lost worker's job waits for its retry while retries last (workers/liveness.py)
                ended = status in ENDED or (status == "started" and worker not in alive
                                            and int(retries or 0) == 0)
            if ended:
                gone.append(job_id)
        if gone:
            self.redis.zrem(key, *gone)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
