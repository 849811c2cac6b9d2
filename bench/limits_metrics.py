"""What the per-team limits and the scrape-time metrics cost, on a real Redis, as a team's backlog grows.

Every submission prunes its team's two job sets against the jobs' RQ hashes and reserves a place in
one Lua script; every scrape reads each queue's head and registry, the workers and the workers'
recorded outcomes. Both grow with what is queued, so this times them with 0, 64 and 1000 jobs
waiting (the default limits), in-process, against the Redis of ``REDIS_URL``. It only touches keys
that contain ``benchlimits`` and removes them afterwards.

    REDIS_URL=redis://127.0.0.1:6379/5 .venv/bin/python -m bench.limits_metrics
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from prometheus_client import generate_latest
from redis import Redis

from service.errors import Problem
from service.limits import TeamLimits
from service.metrics import registry_for
from service.queueing import Queues
from service.settings import Settings

PREFIX = "benchlimits-"
TEAM = "benchlimits"
PROBE = "benchlimitsprobe"
OUT = Path(__file__).resolve().parent / "results" / "limits-metrics.md"


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and 95th percentile of ``repeat`` calls, in milliseconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def admit_and_release(limits: TeamLimits) -> None:
    limits.admit(TEAM, PROBE)
    limits.release(TEAM, PROBE)


def refused(limits: TeamLimits) -> None:
    try:
        limits.admit(TEAM, PROBE)
    except Problem as problem:
        assert problem.status == 429
    else:
        raise AssertionError("admitted over the limit")


def cleanup(redis: Redis) -> None:
    keys = list(redis.scan_iter(match="*benchlimits*", count=1000))
    for start in range(0, len(keys), 500):
        redis.delete(*keys[start:start + 500])


def main() -> None:
    url = os.environ.get("REDIS_URL")
    if not url:
        raise SystemExit("REDIS_URL is not set: expected a Redis to measure against")
    redis = Redis.from_url(url)
    cleanup(redis)
    rows = []
    with tempfile.TemporaryDirectory() as var:
        settings = Settings(redis_url=url, var_dir=Path(var), queue_prefix=PREFIX, rate_limit="1000000/minute",
                            max_active_jobs_per_team=100_000, max_queued_jobs_per_team=100_000)
        limits = TeamLimits(redis, settings)
        queues = Queues(redis, settings, None, limits)
        scraped = registry_for(queues)
        queued = 0
        try:
            for backlog in (0, 64, 1000):
                while queued < backlog:
                    job_id = f"benchlimits{queued}"
                    limits.admit(TEAM, job_id)
                    queues.enqueue("attacks", "workers.jobs.run_attack", {}, job_id=job_id,
                                   meta={"kind": "attack", "team": TEAM})
                    queued += 1
                admit = timed(partial(admit_and_release, limits), 200)
                full = None
                if backlog:  # at the limit: every admission prunes both sets, then refuses
                    at_limit = TeamLimits(redis, settings.model_copy(update={
                        "max_active_jobs_per_team": backlog, "max_queued_jobs_per_team": backlog}))
                    full = timed(partial(refused, at_limit), 50)
                rate = timed(lambda: limits.check_rate(TEAM), 200)
                scrape = timed(lambda: generate_latest(scraped), 50)
                assert limits.counts(TEAM) == (backlog, backlog)
                rows.append((backlog, admit, full, rate, scrape))
        finally:
            cleanup(redis)
    lines = [
        "# Cost of the per-team limits and of a /metrics scrape",
        "",
        "Command: `REDIS_URL=redis://127.0.0.1:6379/5 .venv/bin/python -m bench.limits_metrics`",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- {platform.node()}, {os.cpu_count()} cores, Redis {redis.info()['redis_version']} on localhost",
        "- in-process (no HTTP); one team with N attack jobs queued (N active, N waiting); ms, median / p95",
        "",
        "| jobs queued | admit + release, under the limits | refused at the limit (prune both sets) "
        "| rate check (`limits` moving window) | scrape of the Redis-read metrics |",
        "|---|---|---|---|---|",
    ]
    for backlog, admit, full, rate, scrape in rows:
        at = f"{full[0]:.2f} / {full[1]:.2f}" if full else "-"
        lines.append(f"| {backlog} | {admit[0]:.2f} / {admit[1]:.2f} | {at} | {rate[0]:.2f} / {rate[1]:.2f} "
                     f"| {scrape[0]:.2f} / {scrape[1]:.2f} |")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
