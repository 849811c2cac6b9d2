"""Faults an operator meets: a worker killed mid-job, a worker stopped mid-job, Redis restarted
with work queued, a second ``serve`` on a var dir in use. Real processes throughout: a
redis-server with AOF started here, a gateway, and worker processes killed with real signals.

Every accepted job must end ``succeeded`` with the result of an undisturbed run (bit for bit on
CPU: kernels are deterministic per seed), run exactly as often as it was interrupted plus one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.serializers import JSONSerializer

from models.manifest import HOSTED_DIR, CardIndex
from tests.conftest import REPO
from tests.integration.conftest import free_port

TIMEOUT_S = 240
HEARTBEAT_TTL_S = 6
ATTACK = {"model": "fmnist-cnn", "seed": 3, "batch_size": 16,
          "attack": {"name": "pgd", "norm": "linf", "eps": 0.02, "steps": 30, "step_size": 0.002},
          "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 32}}
AUDIT = {"model": "fmnist-cnn", "suite": "quick", "eps": {"linf": [0.02]}, "steps": 20,
         "chunk_size": 16, "seed": 5, "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 32}}


def poll(what: Callable[[], Any], message: str | Callable[[], str], timeout_s: float = TIMEOUT_S) -> Any:
    """``what()`` until it returns something truthy; fail with ``message`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(0.1)


class Fleet:
    """A redis-server (AOF) on its own port, a gateway, and named worker processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.var = root / "var"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {**os.environ, "REDIS_URL": self.redis_url, "ADVERSA_VAR_DIR": str(self.var),
                    "ADVERSA_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S), "PYTHONPATH": str(REPO),
                    # one thread per worker: two workers share two cores without spinning
                    "OMP_NUM_THREADS": "1"}
        self.env.pop("ADVERSA_QUEUE_PREFIX", None)
        self.redis_process: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.start_redis()
        self.redis = Redis.from_url(self.redis_url)
        self._known_batch_size()
        gateway_port = free_port()
        self.gateway = self._spawn("gateway", "serve", "--port", str(gateway_port), "--workers", "0")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=60)
        poll(self._healthy, lambda: "gateway not up\n" + self.tail())

    def _known_batch_size(self) -> None:
        """The chunk size of fmnist-cnn on CPU, as a worker would measure it once per var dir
        (tens of seconds on a loaded machine; not what these tests are about)."""
        from workers.cache import card_key

        card = CardIndex([HOSTED_DIR]).card("fmnist-cnn")
        assert card is not None
        self.var.mkdir(parents=True, exist_ok=True)
        (self.var / "batch_sizes.json").write_text(json.dumps({f"{card_key(card)}:cpu": 32}))

    def _spawn(self, log: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env={**self.env, **(env or {})},
                                cwd=REPO,
                                stdout=(self.logs / f"{log}.log").open("ab"), stderr=subprocess.STDOUT)

    def _healthy(self) -> bool:
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def start_redis(self) -> None:
        self.redis_process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.root), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--maxmemory-policy", "noeviction"],
            stdout=(self.logs / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        probe = Redis(port=self.port, socket_timeout=2)
        poll(lambda: self._pings(probe), "redis-server did not start")
        probe.close()

    @staticmethod
    def _pings(client: Redis) -> bool:
        try:
            return bool(client.ping())
        except RedisError:
            return False

    def restart_redis(self) -> None:
        assert self.redis_process is not None
        self.redis_process.terminate()  # Redis's own shutdown: the AOF is complete
        self.redis_process.wait(timeout=60)
        self.start_redis()

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        process = self._spawn(f"worker-{name}", "worker", "--name", name, env=env)
        self.workers[name] = process
        poll(lambda: name in self.ready_workers(), lambda: f"worker {name} not ready\n" + self.tail())
        return process

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        process = self.workers.pop(name)
        process.send_signal(sig)
        assert process.wait(timeout=TIMEOUT_S) is not None

    def ready_workers(self) -> list[str]:
        response = self.client.get("/readyz")
        return [] if response.status_code != 200 else response.json()["worker_names"]

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)

    def view(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}")
        return response.json() if response.status_code == 200 else {"status": f"http {response.status_code}"}

    def submit(self, path: str, body: dict[str, Any]) -> str:
        response = self.client.post(path, json=body)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def succeeded(self, job_id: str) -> dict[str, Any]:
        """Poll until the job succeeds; a job that ends failed or canceled fails the test."""
        def done() -> dict[str, Any] | None:
            view = self.view(job_id)
            assert view["status"] not in ("canceled",), view
            if view["status"] == "failed" and view["error"]["code"] != "worker-lost":
                raise AssertionError(view)
            return view if view["status"] == "succeeded" else None
        return poll(done, lambda: f"job {job_id}: {self.view(job_id)}\n" + self.tail())

    def artifact(self, job_id: str, name: str) -> bytes:
        response = self.client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert response.status_code == 200, response.text
        return response.content

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.logs.iterdir()))

    def stop(self) -> None:
        self.client.close()
        for process in [*self.workers.values(), self.gateway]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.workers.values(), self.gateway]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.redis_process is not None:
            self.redis_process.terminate()
            self.redis_process.wait(timeout=60)
        self.redis.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if shutil.which("redis-server") is None:
        pytest.fail("the fault tests need redis-server on PATH (apt install redis-server)")
    running = Fleet(tmp_path_factory.mktemp("faults"))
    try:
        yield running
    finally:
        running.stop()


def timeless(value: Any) -> Any:
    """A result without its wall-clock figures."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def running(fleet: Fleet, job_id: str) -> str | None:
    """The name of the worker running ``job_id``, else None."""
    job = fleet.job(job_id)
    return job.worker_name if job.get_status() == "started" else None


def test_a_job_whose_worker_is_killed_runs_again_with_the_same_result(fleet: Fleet) -> None:
    fleet.start_worker("doomed")
    job_id = fleet.submit("/v1/attacks", ATTACK)
    assert poll(lambda: running(fleet, job_id), "the attack never ran") == "doomed"
    fleet.kill("doomed")
    # Liveness is the heartbeat: readiness drops once the dead worker's heartbeat is stale.
    poll(lambda: fleet.client.get("/readyz").status_code == 503, "readyz still counts the dead worker")
    assert fleet.view(job_id)["status"] in ("running", "queued", "failed")
    fleet.start_worker("doomed")  # the dead worker's name is free again; the job runs again
    first = fleet.succeeded(job_id)
    assert fleet.job(job_id).meta["attempts"] == 2

    again = fleet.succeeded(fleet.submit("/v1/attacks", ATTACK))
    assert fleet.job(again["id"]).meta["attempts"] == 1
    assert timeless(first["result"]) == timeless(again["result"])
    for name in ("adversarial.npy", "samples.csv"):
        assert fleet.artifact(job_id, name) == fleet.artifact(again["id"], name), name


def test_a_killed_audit_chunk_runs_again_and_the_merge_waits_for_it(fleet: Fleet) -> None:
    for name in ("spare", "other"):
        if len(fleet.workers) < 2:
            fleet.start_worker(name)
    audit_id = fleet.submit("/v1/audits", AUDIT)
    chunks = [f"{audit_id}c0", f"{audit_id}c1"]
    victim = poll(lambda: running(fleet, chunks[0]) or running(fleet, chunks[1]),
                  "no chunk ran")
    fleet.kill(victim)
    # Never reported failed while a live worker can take the lost chunk over.
    view = poll(lambda: (v := fleet.view(audit_id))["status"] in ("succeeded", "failed") and v,
                lambda: f"audit stuck: {fleet.view(audit_id)}\n" + fleet.tail())
    assert view["status"] == "succeeded", view
    attempts = sorted(fleet.job(c).meta["attempts"] for c in chunks)
    assert attempts == [1, 2] and fleet.job(audit_id).meta["attempts"] == 1
    fleet.start_worker(victim)

    again = fleet.succeeded(fleet.submit("/v1/audits", AUDIT))
    assert timeless(view["result"]) == timeless(again["result"])
    assert fleet.artifact(audit_id, "samples.csv") == fleet.artifact(again["id"], "samples.csv")


def test_a_stopped_worker_requeues_its_job_and_a_restarted_redis_keeps_it(fleet: Fleet) -> None:
    for name in list(fleet.workers)[1:]:
        fleet.kill(name, signal.SIGTERM)
    (name,) = fleet.workers
    job_id = fleet.submit("/v1/attacks", ATTACK)
    poll(lambda: running(fleet, job_id), "the attack never ran")
    process = fleet.workers[name]
    fleet.kill(name, signal.SIGTERM)  # drains: the job goes back to the queue, not to failed
    assert process.returncode == 0
    assert fleet.job(job_id).get_status() == "queued" and fleet.view(job_id)["status"] == "queued"

    fleet.restart_redis()
    assert fleet.job(job_id).get_status() == "queued"
    fleet.start_worker(name)
    result = fleet.succeeded(job_id)
    assert fleet.job(job_id).meta["attempts"] == 1  # a drain is not an attempt
    assert result["result"]["scores"]["n"] == 32


def test_a_job_out_of_retries_fails_as_worker_lost_with_its_attempts(fleet: Fleet) -> None:
    fleet.start_worker("last-try", ADVERSA_JOB_RETRIES="0")
    for name in list(fleet.workers)[:-1]:
        fleet.kill(name, signal.SIGTERM)
    job_id = fleet.submit("/v1/attacks", {**ATTACK, "seed": 4})
    poll(lambda: running(fleet, job_id), "the attack never ran")
    fleet.kill("last-try")
    fleet.start_worker("cleaner")  # its registry cleanup finds the job abandoned, with no retry left
    view = poll(lambda: "attempt 1 of 1" in ((v := fleet.view(job_id)).get("error") or {}).get("message", "")
                and v, lambda: f"job {job_id}: {fleet.view(job_id)}\n" + fleet.tail())
    assert view["status"] == "failed" and view["error"]["code"] == "worker-lost", view
    assert fleet.job(job_id).get_status() == "failed"  # RQ's record agrees: never run again


def test_a_second_serve_on_a_var_dir_in_use_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ADVERSA_REDIS_URL")}
    env.update({"ADVERSA_VAR_DIR": str(tmp_path / "var"), "PYTHONPATH": str(REPO)})
    command = [sys.executable, "-m", "service.cli", "serve", "--workers", "0"]
    first = subprocess.Popen([*command, "--port", str(free_port())], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "var" / "serve.lock"
        owner = poll(lambda: lock.is_file() and lock.read_text() and json.loads(lock.read_text()),
                     "the first serve never took the var dir")
        assert owner["pid"] == first.pid
        second = subprocess.run([*command, "--port", str(free_port())], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        assert second.returncode != 0
        assert f"pid {first.pid}" in second.stderr and owner["redis"] in second.stderr, second.stderr
        assert first.poll() is None  # the first one (and its Redis) untouched
        assert Redis.from_url(owner["redis"]).ping()
    finally:
        first.terminate()
        first.wait(timeout=60)
