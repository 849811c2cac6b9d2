"""Soak: a stream of small jobs while workers are SIGKILLed and Redis is restarted; nothing may be
lost or run twice.

    .venv/bin/python -m bench.soak [--jobs 200] [--rate 1] [--workers 2] [--kill-every 20]
                                   [--timeout 1200] [--out bench/results]

Starts, in a temporary directory, a redis-server (AOF, ``appendfsync always``, ``noeviction``), a
gateway (``adversa serve --workers 0``) and ``--workers`` worker processes (heartbeat TTL 6 s, one
torch thread each), then submits ``--jobs`` attacks over HTTP at ``--rate`` per second (PGD-10 on
16 Fashion-MNIST images in two chunks, four distinct bodies in turn). Meanwhile a random worker is
SIGKILLed every ``--kill-every`` seconds and a fresh one started in its place, and Redis is
restarted once (SIGTERM, then the same AOF), half way through the submissions. A submission
refused while Redis is down (503) is retried by the client after its ``Retry-After`` and counts
as refused, not accepted.

Reported: jobs accepted, succeeded, retried (run more than once: their worker was killed),
lost (accepted and not succeeded by the end: goal 0), duplicated (completed by a worker more than
once, from the workers' ``Job OK`` log lines: goal 0), results that differ between jobs of the same
body (goal 0), orphan blobs (goal 0), and p50/p99 job latency (RQ's enqueue to end). The team job
limit is raised to the job count: this measures the fault machinery, not admission. Writes
``soak.md`` and ``soak.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.serializers import JSONSerializer

from bench.attacks import command_line

REPO = Path(__file__).resolve().parent.parent
HEARTBEAT_TTL_S = 6
TERMINAL = ("finished", "failed", "canceled", "stopped")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def body(i: int) -> dict[str, Any]:
    """The i-th job: one of four bodies, so that every job's result can be compared with its peers'."""
    variant = i % 4
    return {"model": "fmnist-cnn", "seed": variant, "batch_size": 8,
            "attack": {"name": "pgd", "norm": "linf", "eps": 0.03, "steps": 10, "step_size": 0.005},
            "inputs": {"dataset": "fashion-mnist:test", "offset": 16 * variant, "limit": 16}}


def timeless(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


class Stack:
    """redis-server, gateway and workers under ``root``; every process started here is stopped here."""

    def __init__(self, root: Path, workers: int) -> None:
        self.root, self.logs, self.var = root, root / "logs", root / "var"
        self.logs.mkdir(parents=True)
        self.port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {**os.environ, "REDIS_URL": self.redis_url, "ADVERSA_VAR_DIR": str(self.var),
                    "ADVERSA_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S), "PYTHONPATH": str(REPO),
                    "OMP_NUM_THREADS": "1", "ADVERSA_MAX_ACTIVE_JOBS_PER_TEAM": "100000"}
        self.env.pop("ADVERSA_QUEUE_PREFIX", None)
        self.redis_process: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.started = 0
        self.start_redis()
        self.redis = Redis.from_url(self.redis_url)
        self._known_batch_size()
        gateway_port = free_port()
        self.gateway = self._spawn("gateway", "serve", "--port", str(gateway_port), "--workers", "0")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=60)
        self._wait(lambda: self._get("/healthz") == 200, "gateway")
        for _ in range(workers):
            self.start_worker()
        self._wait(lambda: self._get("/readyz") == 200, "workers")

    def _known_batch_size(self) -> None:
        """fmnist-cnn's CPU chunk size, as a worker would measure it once per var dir."""
        from models.manifest import HOSTED_DIR, CardIndex
        from workers.cache import card_key

        card = CardIndex([HOSTED_DIR]).card("fmnist-cnn")
        assert card is not None
        self.var.mkdir(parents=True, exist_ok=True)
        (self.var / "batch_sizes.json").write_text(json.dumps({f"{card_key(card)}:cpu": 32}))

    def _spawn(self, log: str, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=self.env, cwd=REPO,
                                stdout=(self.logs / f"{log}.log").open("ab"), stderr=subprocess.STDOUT)

    def _get(self, path: str) -> int:
        try:
            return self.client.get(path).status_code
        except httpx.TransportError:
            return 0

    @staticmethod
    def _wait(what: Any, name: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not what():
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not come up in {timeout_s} s")
            time.sleep(0.2)

    def start_redis(self) -> None:
        self.redis_process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.root), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--maxmemory-policy", "noeviction"],
            stdout=(self.logs / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        probe = Redis(port=self.port, socket_timeout=2)

        def pings() -> bool:
            try:
                return bool(probe.ping())
            except RedisError:
                return False

        self._wait(pings, "redis-server")
        probe.close()

    def restart_redis(self) -> float:
        """Stop Redis (its own shutdown: the AOF is complete) and start it on the same files; the
        seconds it was down."""
        assert self.redis_process is not None
        begin = time.monotonic()
        self.redis_process.terminate()
        self.redis_process.wait(timeout=60)
        self.start_redis()
        return time.monotonic() - begin

    def start_worker(self) -> str:
        name = f"soak-{self.started}"
        self.started += 1
        self.workers[name] = self._spawn(f"worker-{name}", "worker", "--name", name)
        return name

    def kill_worker(self, rng: random.Random) -> str:
        name = rng.choice(sorted(self.workers))
        process = self.workers.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        return name

    def completions(self) -> dict[str, int]:
        """Job id -> how many times a worker logged it ``Job OK``."""
        counts: dict[str, int] = {}
        for path in self.logs.glob("worker-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if "Job OK (" in line:
                    job_id = line.rsplit("Job OK (", 1)[1].split(")", 1)[0]
                    counts[job_id] = counts.get(job_id, 0) + 1
        return counts

    def stop(self) -> None:
        self.client.close()
        processes = [*self.workers.values(), self.gateway]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.redis_process is not None:
            self.redis_process.terminate()
            self.redis_process.wait(timeout=60)
        self.redis.close()


def orphans(var: Path, accepted: set[str]) -> list[str]:
    """Blobs no accepted job accounts for (see ``tests/integration/test_faults.py``)."""
    root = var / "blobs"
    found = []
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.is_file():
            key = path.relative_to(root).as_posix()
            kind, _, rest = key.partition("/")
            owner = rest.split("/", 1)[0].removesuffix(".npz")
            known = kind in ("jobs", "audits", "inputs") and owner in accepted
            if path.name.startswith(".tmp-") or not known:
                found.append(key)
    return found


def statuses(redis: Redis, ids: list[str]) -> dict[str, str]:
    """RQ status of each job (``missing`` when Redis lost it); {} while Redis is down."""
    try:
        with redis.pipeline() as pipeline:
            for job_id in ids:
                pipeline.hget(f"rq:job:{job_id}", "status")
            found = pipeline.execute()
    except RedisError:
        return {}
    return {job_id: (s.decode() if s else "missing") for job_id, s in zip(ids, found, strict=True)}


def soak(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    accepted: dict[str, int] = {}  # job id -> body index
    refused: dict[int, int] = {}  # HTTP status (0: no answer) -> count
    done: dict[str, str] = {}
    kills: list[dict[str, Any]] = []
    redis_down_s: float | None = None
    start = time.monotonic()
    restart_at = start + 0.5 * args.jobs / args.rate
    next_kill = start + args.kill_every
    next_submit = start
    deadline = start + args.timeout
    next_poll = start
    while len(accepted) < args.jobs or len(done) < len(accepted):
        now = time.monotonic()
        if now > deadline:
            break
        if len(accepted) < args.jobs and now >= next_submit:
            i = len(accepted)
            try:
                response = stack.client.post("/v1/attacks", json=body(i))
                code = response.status_code
            except httpx.TransportError:
                code, response = 0, None
            if code == 202 and response is not None:
                accepted[str(response.json()["id"])] = i
                next_submit = max(next_submit + 1 / args.rate, now - 1)
            else:
                refused[code] = refused.get(code, 0) + 1
                retry_after = float(response.headers.get("retry-after", 1)) if response is not None else 1.0
                next_submit = now + min(retry_after, 2.0)
        if now >= next_kill:
            victim = stack.kill_worker(rng)
            replacement = stack.start_worker()
            kills.append({"at_s": round(now - start, 1), "killed": victim, "started": replacement})
            next_kill += args.kill_every
        if redis_down_s is None and now >= restart_at:
            redis_down_s = stack.restart_redis()
            kills.append({"at_s": round(now - start, 1), "redis_restarted": True,
                          "down_s": round(redis_down_s, 2)})
        if now >= next_poll:
            pending = [j for j in accepted if j not in done]
            for job_id, status in statuses(stack.redis, pending).items():
                if status in TERMINAL:
                    done[job_id] = status
            next_poll = now + 1.0
        time.sleep(0.02)
    wall_s = time.monotonic() - start
    return {"accepted": accepted, "refused": refused, "events": kills, "wall_s": wall_s,
            "redis_down_s": redis_down_s}


def account(stack: Stack, run: dict[str, Any]) -> dict[str, Any]:
    """The end state of every accepted job, read back through the gateway and RQ."""
    accepted: dict[str, int] = run["accepted"]
    views = {job_id: stack.client.get(f"/v1/jobs/{job_id}").json() for job_id in accepted}
    jobs = {job_id: Job.fetch(job_id, connection=stack.redis, serializer=JSONSerializer)
            for job_id, v in views.items() if v.get("status") == "succeeded"}
    succeeded = sorted(jobs)
    completions = stack.completions()
    attempts = {job_id: int(job.meta.get("attempts", 1)) for job_id, job in jobs.items()}
    latencies = [(job.ended_at - job.created_at).total_seconds() for job in jobs.values()
                 if job.ended_at is not None and job.created_at is not None]
    results: dict[int, list[Any]] = {}
    for job_id in succeeded:
        results.setdefault(accepted[job_id] % 4, []).append(timeless(views[job_id]["result"]))
    differing = sum(sum(r != rs[0] for r in rs) for rs in results.values())
    differing_keys = sorted({k for rs in results.values() for r in rs for k in r if r.get(k) != rs[0].get(k)})
    lost = {job_id: views[job_id].get("status", "missing") for job_id in accepted if job_id not in jobs}
    return {
        "accepted": len(accepted),
        "refused_submissions": {str(k): v for k, v in sorted(run["refused"].items())},
        "succeeded": len(succeeded),
        "retried": sum(a > 1 for a in attempts.values()),
        "attempts_histogram": {str(a): sum(v == a for v in attempts.values())
                               for a in sorted(set(attempts.values()))},
        "lost": len(lost),
        "lost_jobs": lost,
        "duplicated": sum(completions.get(job_id, 0) > 1 for job_id in accepted),
        "never_completed_by_a_worker": sum(completions.get(job_id, 0) == 0 for job_id in succeeded),
        "results_differing_from_their_peers": differing,
        "differing_fields": differing_keys,
        "orphan_blobs": orphans(stack.var, set(accepted)),
        "latency_s": {"p50": float(np.percentile(latencies, 50)) if latencies else None,
                      "p99": float(np.percentile(latencies, 99)) if latencies else None,
                      "max": max(latencies, default=None)},
        "worker_kills": sum("killed" in e for e in run["events"]),
        "redis_restarts": sum("redis_restarted" in e for e in run["events"]),
        "redis_down_s": run["redis_down_s"],
        "events": run["events"],
        "wall_s": round(run["wall_s"], 1),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1.0, help="submissions per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker SIGKILLs")
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up (count the rest lost) after")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("the soak needs redis-server on PATH")

    load_before, uptime_before = os.getloadavg(), uptime()
    with tempfile.TemporaryDirectory(prefix="adversa-soak-") as tmp:
        stack = Stack(Path(tmp), args.workers)
        try:
            figures = account(stack, soak(stack, args))
        finally:
            stack.stop()
    result = {
        "command": command_line("soak", argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "uptime_before": uptime_before, "uptime_after": uptime()},
        "settings": {"jobs": args.jobs, "rate_per_s": args.rate, "workers": args.workers,
                     "kill_every_s": args.kill_every, "heartbeat_ttl_s": HEARTBEAT_TTL_S,
                     "job": body(0)},
        **figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(result))
    print(markdown(result))  # noqa: T201 - a bench's report


def markdown(result: dict[str, Any]) -> str:
    m, s, lat = result["machine"], result["settings"], result["latency_s"]

    def sec(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f} s"

    lines = [
        f"# Soak: {s['jobs']} jobs, a worker SIGKILLed every {s['kill_every_s']:g} s, Redis restarted once", "",
        f"`{result['command']}` ({result['date']}; {m['cpu_count']} CPU cores; load average "
        f"{m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after: the machine is shared, "
        "these figures were taken under other engineers' load)", "",
        f"`uptime` before: `{m['uptime_before']}`; after: `{m['uptime_after']}`", "",
        f"{s['workers']} workers (heartbeat TTL {s['heartbeat_ttl_s']} s, one torch thread each), "
        f"submissions at {s['rate_per_s']:g}/s over HTTP; each job PGD-10 (Linf 0.03) on 16 Fashion-MNIST "
        "images in two chunks, four distinct bodies in turn. "
        f"{result['worker_kills']} worker kills, {result['redis_restarts']} Redis restart "
        f"(down {sec(result['redis_down_s'])}); wall time {result['wall_s']:.0f} s.", "",
        "| figure | value | goal |",
        "|---|---:|---:|",
        f"| jobs accepted (202) | {result['accepted']} | {s['jobs']} |",
        f"| submissions refused (retried by the client) | {sum(result['refused_submissions'].values())} "
        f"{result['refused_submissions'] or ''} | |",
        f"| succeeded | {result['succeeded']} | {result['accepted']} |",
        f"| retried (run more than once: worker killed) | {result['retried']} | |",
        f"| lost | {result['lost']} | 0 |",
        f"| duplicated (completed twice) | {result['duplicated']} | 0 |",
        f"| results differing from the same body's | {result['results_differing_from_their_peers']} | 0 |",
        f"| orphan blobs | {len(result['orphan_blobs'])} | 0 |",
        f"| job latency p50 (enqueue to end) | {sec(lat['p50'])} | |",
        f"| job latency p99 | {sec(lat['p99'])} | |",
        f"| job latency max | {sec(lat['max'])} | |",
        "",
        f"Attempts per succeeded job: {result['attempts_histogram']}. Completed "
        f"{result['succeeded'] / result['wall_s']:.2f} jobs/s against submissions at {s['rate_per_s']:g}/s"
        + (": the queue grew, so the latency is mostly time spent queued, and a worker killed while still "
           "starting (tens of seconds under load) ran no job." if result['succeeded'] / result['wall_s']
           < 0.95 * s['rate_per_s'] else "."),
        "",
        "Events (seconds from the first submission): "
        + "; ".join(f"{e['at_s']:g}: " + (f"Redis restarted (down {e['down_s']:g} s)" if "redis_restarted" in e
                                          else f"SIGKILL {e['killed']}, started {e['started']}")
                    for e in result["events"]) + ".",
        "",
    ]
    if result["lost_jobs"]:
        lines += ["Lost: " + ", ".join(f"{k} ({v})" for k, v in result["lost_jobs"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
