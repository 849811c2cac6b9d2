"""The integration suites' service: a real gateway process and a real worker process on a real
Redis, each in its own temporary var directory, driven over real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from tests.conftest import REPO

JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    """A started gateway + worker pair."""

    client: httpx.Client
    var: Path
    worker: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.var / "logs"

    def stop(self) -> None:
        self.client.close()
        for process in (self.worker, self.gateway):
            if process.poll() is None:
                process.terminate()
        for process in (self.worker, self.gateway):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def start_service(redis_url: str, var: Path, queue_prefix: str = "",
                  worker_name: str = "e2e-worker") -> Running:
    """Start a worker and a gateway (no embedded worker) on ``redis_url``; wait until ready."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "ADVERSA_VAR_DIR": str(var),
           "ADVERSA_PREDICT_TIMEOUT_S": "60", "ADVERSA_QUEUE_PREFIX": queue_prefix,
           "PYTHONPATH": str(REPO)}
    logs = var / "logs"
    logs.mkdir(parents=True)
    cli = [sys.executable, "-m", "service.cli"]
    running = Running(
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120), var,
        subprocess.Popen([*cli, "worker", "--name", worker_name], env=env, cwd=REPO,
                         stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT),
        subprocess.Popen([*cli, "serve", "--port", str(port), "--workers", "0"], env=env,
                         cwd=REPO, stdout=(logs / "gateway.log").open("wb"), stderr=subprocess.STDOUT),
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        try:
            if running.client.get("/readyz").status_code == 200:
                return running
        except httpx.TransportError:
            pass
        for process in (running.worker, running.gateway):
            if process.poll() is not None:
                running.stop()
                raise AssertionError(_logs(logs))
        if time.monotonic() > deadline:
            running.stop()
            raise AssertionError(f"service not ready in {JOB_TIMEOUT_S} s\n" + _logs(logs))
        time.sleep(0.5)


@contextmanager
def gateway_process(redis_url: str, var: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A gateway alone (``adversa serve --workers 0``) on ``redis_url`` and ``var``, with ``env``
    added to its environment; yields its base URL once /healthz answers, stops it after."""
    port = free_port()
    environment = {**os.environ, "REDIS_URL": redis_url, "ADVERSA_VAR_DIR": str(var), "PYTHONPATH": str(REPO),
                   **(env or {})}
    log_path = var / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                    "--workers", "0"], env=environment, cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=10).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, (f"gateway not up in {JOB_TIMEOUT_S} s\n"
                                                     + log_path.read_text()[-3000:])
                time.sleep(0.3)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    Redis.from_url(redis_url).flushdb()
    running = start_service(redis_url, tmp_path_factory.mktemp("var"))
    try:
        yield running.client
    finally:
        running.stop()
        Redis.from_url(redis_url).flushdb()


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(directory.iterdir()))


def wait(client: httpx.Client, job_id: str, until: tuple[str, ...] = ("succeeded", "failed",
                                                                        "canceled")) -> Any:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, f"job stuck: {job}"
        time.sleep(0.3)


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/attacks", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])




def wait_for_training(client: httpx.Client, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> Any:
    """Poll until a training job runs and has reported a batch in its ``stage``; the job view."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and (job.get("stage") or {}).get("batch"):
            return job
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.3)
