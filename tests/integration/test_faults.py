"""Faults an operator meets: a worker killed during an attack, a defense training, an audit chunk
or an audit merge; a worker stopped mid-job; ``adversa serve`` stopped mid-job; Redis restarted
with work queued and running; a second ``serve`` on a var dir in use. Real processes throughout:
a redis-server with AOF started here, a gateway, and worker processes killed with real signals.

Every accepted job must end ``succeeded`` with the result of an undisturbed run (bit for bit on
CPU: kernels are deterministic per seed), or ``canceled`` when canceled; run exactly as often as
it was interrupted plus one, completed once, and leave no blob that no accepted job accounts for.
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
AUDIT: dict[str, Any] = {"model": "fmnist-cnn", "suite": "quick", "eps": {"linf": [0.02]}, "steps": 20,
                         "chunk_size": 16, "seed": 5,
                         "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 32}}
# One epoch of FGSM training on 1600 images in 100 batches (progress is saved every 50: the kill
# lands half way) and a small evaluation.
DEFENSE = {"model": "fmnist-cnn", "seed": 0, "evaluation": {"clean_limit": 64, "robust_limit": 16, "steps": 2},
           "defense": {"name": "fgsm-adversarial-training", "epochs": 1, "limit": 1600, "batch_size": 16}}


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
        self.accepted: set[str] = set()
        self._calm: dict[str, dict[str, Any]] = {}
        self.start_redis()
        self.redis = Redis.from_url(self.redis_url)
        self._known_batch_size()
        gateway_port = free_port()
        self.gateway = self._spawn("gateway", "serve", "--port", str(gateway_port), "--workers", "0")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=60)
        poll(self._healthy, lambda: "gateway not up\n" + self.tail())

    def _known_batch_size(self) -> None:
        known_batch_size(self.var)

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

    def only(self, name: str) -> None:
        """Exactly one worker, ``name``: the others stop (drained), it starts if it is not up."""
        for other in [n for n in self.workers if n != name]:
            self.kill(other, signal.SIGTERM)
        if name not in self.workers:
            self.start_worker(name)

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
        self.accepted.add(str(response.json()["id"]))
        return str(response.json()["id"])

    def undisturbed(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The view of ``body`` run once with no fault (cached for the module), with its artifacts'
        bytes under ``"bytes"``. Needs a worker."""
        key = path + json.dumps(body, sort_keys=True)
        if key not in self._calm:
            if not self.workers:
                self.start_worker("calm")
            view = self.succeeded(self.submit(path, body))
            assert self.job(view["id"]).meta["attempts"] == 1
            timed = ("report.html", "audit.json")  # they carry the run's wall-clock times
            artifacts = [a for a in view["result"].get("artifacts", []) if a not in timed]
            self._calm[key] = {**view, "bytes": {a: self.artifact(view["id"], a) for a in artifacts}}
        return self._calm[key]

    def completions(self, job_id: str) -> int:
        """How many times a worker completed ``job_id`` (RQ logs ``Job OK (<id>)`` once per run)."""
        return sum(p.read_text(errors="replace").count(f"Job OK ({job_id})")
                   for p in self.logs.glob("worker-*.log"))

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


def known_batch_size(var: Path) -> None:
    """The chunk size of fmnist-cnn on CPU, as a worker would measure it once per var dir
    (tens of seconds on a loaded machine; not what these tests are about)."""
    from workers.cache import card_key

    card = CardIndex([HOSTED_DIR]).card("fmnist-cnn")
    assert card is not None
    var.mkdir(parents=True, exist_ok=True)
    (var / "batch_sizes.json").write_text(json.dumps({f"{card_key(card)}:cpu": 32}))


def orphans(var: Path, accepted: set[str]) -> list[str]:
    """Blobs under ``var`` that no accepted job accounts for: a half-written temporary file, or
    inputs (``inputs/<id>.npz``), audit chunks (``audits/<id>/``) or artifacts (``jobs/<id>/``) of an
    id the gateway never accepted; and half-published registry entries (``.staging-*``)."""
    root = var / "blobs"
    found = []
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if not path.is_file():
            continue
        key = path.relative_to(root).as_posix()
        kind, _, rest = key.partition("/")
        owner = rest.split("/", 1)[0].removesuffix(".npz")
        if path.name.startswith(".tmp-") or kind not in ("jobs", "audits", "inputs") or owner not in accepted:
            found.append(key)
    models = var / "models"
    found += [p.relative_to(var).as_posix() for p in models.rglob(".staging-*")] if models.exists() else []
    return found


def artifacts_match(fleet: Fleet, job_id: str, calm: dict[str, Any]) -> None:
    """Artifacts of ``job_id`` are those of the undisturbed run, byte for byte, and nothing else."""
    view = fleet.view(job_id)
    assert timeless(view["result"]) == timeless(calm["result"])
    for name, data in calm["bytes"].items():
        assert fleet.artifact(job_id, name) == data, name
    stored = {p.name for p in (fleet.var / "blobs" / "jobs" / job_id).iterdir()}
    assert stored == set(calm["result"]["artifacts"]), stored


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
    fleet.succeeded(job_id)
    assert fleet.job(job_id).meta["attempts"] == 2

    assert fleet.completions(job_id) == 1
    artifacts_match(fleet, job_id, fleet.undisturbed("/v1/attacks", ATTACK))
    assert orphans(fleet.var, fleet.accepted) == []


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

    artifacts_match(fleet, audit_id, fleet.undisturbed("/v1/audits", AUDIT))
    assert orphans(fleet.var, fleet.accepted) == []


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


def test_a_defense_training_whose_worker_is_killed_publishes_once_the_same_model(fleet: Fleet) -> None:
    fleet.only("trainer")
    job_id = fleet.submit("/v1/defenses", {**DEFENSE, "output": "fault-killed"})

    def training() -> bool:
        view = fleet.view(job_id)
        assert view["status"] in ("queued", "running"), view  # not past the training already
        return (view.get("stage") or {}).get("phase") == "train"

    poll(training, "the training never ran")
    fleet.kill("trainer")
    assert fleet.view(job_id)["status"] != "succeeded"  # killed while training, not after
    assert fleet.client.get("/v1/models/fault-killed").status_code == 404
    fleet.start_worker("trainer")
    view = fleet.succeeded(job_id)
    assert view["result"]["model"] == "fault-killed@1"
    assert fleet.job(job_id).meta["attempts"] == 2 and fleet.completions(job_id) == 1

    calm = fleet.undisturbed("/v1/defenses", {**DEFENSE, "output": "fault-calm"})
    killed, again = (fleet.client.get(f"/v1/models/{name}").json() for name in ("fault-killed", "fault-calm"))
    assert killed["versions"] == [1]  # published once
    assert killed["sha256"] == again["sha256"] and killed["metrics"] == again["metrics"]
    assert timeless(view["result"]["metrics"]) == timeless(calm["result"]["metrics"])
    assert orphans(fleet.var, fleet.accepted) == []


def test_a_killed_audit_merge_runs_again_with_the_same_result(fleet: Fleet) -> None:
    """The merge is short (well under a second): the worker is frozen (SIGSTOP) the moment the merge
    shows as started, then killed; a merge that finished before the freeze is tried again."""
    for seed in range(AUDIT["seed"], AUDIT["seed"] + 10):  # a few tries at catching a short merge
        fleet.only("merger")
        process = fleet.workers["merger"]
        audit_id = fleet.submit("/v1/audits", {**AUDIT, "seed": seed})
        merge = fleet.job(audit_id)
        deadline = time.monotonic() + TIMEOUT_S
        while merge.get_status() not in ("started", "finished", "failed"):
            assert time.monotonic() < deadline, "the merge never ran\n" + fleet.tail()
            time.sleep(0.005)
        process.send_signal(signal.SIGSTOP)
        if merge.get_status() == "started":
            break
        process.send_signal(signal.SIGCONT)
        fleet.succeeded(audit_id)
    else:
        pytest.fail("never caught a merge running")
    fleet.kill("merger")  # SIGKILL ends a stopped process too
    fleet.start_worker("merger")
    fleet.succeeded(audit_id)
    chunks = [f"{audit_id}c0", f"{audit_id}c1"]
    assert fleet.job(audit_id).meta["attempts"] == 2 and fleet.completions(audit_id) == 1
    assert [fleet.job(c).meta["attempts"] for c in chunks] == [1, 1]

    artifacts_match(fleet, audit_id, fleet.undisturbed("/v1/audits", {**AUDIT, "seed": seed}))
    assert orphans(fleet.var, fleet.accepted) == []


def test_a_restarted_redis_keeps_queued_running_and_canceled_jobs(fleet: Fleet) -> None:
    calm = fleet.undisturbed("/v1/attacks", ATTACK)
    fleet.only("steady")
    first, second, canceled = (fleet.submit("/v1/attacks", ATTACK) for _ in range(3))
    assert fleet.client.delete(f"/v1/jobs/{canceled}").status_code == 202
    poll(lambda: running(fleet, first), "the attack never ran")
    assert fleet.job(second).get_status() == "queued"
    fleet.restart_redis()  # the worker's connection drops mid-job; AOF keeps every job
    for job_id in (first, second):
        fleet.succeeded(job_id)
        artifacts_match(fleet, job_id, calm)
        assert fleet.completions(job_id) == 1
    assert fleet.view(canceled)["status"] == "canceled" and fleet.completions(canceled) == 0
    assert fleet.job(canceled).meta.get("attempts", 0) == 0  # never ran
    assert orphans(fleet.var, fleet.accepted) == []


def test_a_job_of_a_stopped_serve_is_finished_by_the_next_serve(fleet: Fleet, tmp_path: Path) -> None:
    """``adversa serve`` with its embedded Redis and one worker, stopped (SIGTERM) mid-job: the
    worker drains (the job goes back to the queue at its next chunk, or finishes), Redis saves
    it, and the next ``serve`` on the same var dir runs it to the undisturbed result."""
    calm = fleet.undisturbed("/v1/attacks", ATTACK)
    var = tmp_path / "var"
    known_batch_size(var)
    env = {k: v for k, v in fleet.env.items() if k not in ("REDIS_URL", "ADVERSA_REDIS_URL")}
    env["ADVERSA_VAR_DIR"] = str(var)
    port = free_port()
    log = tmp_path / "serve.log"

    def serve() -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "1"]
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def ready() -> bool:
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def status() -> str:
        return str(client.get(f"/v1/jobs/{job_id}").json()["status"])

    process = serve()
    try:
        poll(ready, lambda: "serve not ready\n" + log.read_text(errors="replace")[-3000:])
        response = client.post("/v1/attacks", json=ATTACK)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        poll(lambda: status() == "running", "the attack never ran")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT_S) == 0
        assert not ready()
        process = serve()
        poll(ready, lambda: "serve did not come back\n" + log.read_text(errors="replace")[-3000:])
        view = poll(lambda: (v := client.get(f"/v1/jobs/{job_id}").json())["status"] == "succeeded" and v,
                    lambda: f"job {job_id}: {status()}\n" + log.read_text(errors="replace")[-3000:])
        assert timeless(view["result"]) == timeless(calm["result"])
        for name, data in calm["bytes"].items():
            assert client.get(f"/v1/jobs/{job_id}/artifacts/{name}").content == data, name
        owner = json.loads((var / "serve.lock").read_text())
        job = Job.fetch(job_id, connection=Redis.from_url(owner["redis"]), serializer=JSONSerializer)
        assert job.meta["attempts"] == 1  # drained, not lost: one run counted
        assert log.read_text(errors="replace").count(f"Job OK ({job_id})") == 1
        assert orphans(var, {job_id}) == []
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=TIMEOUT_S)


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
