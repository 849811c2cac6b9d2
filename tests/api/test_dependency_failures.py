"""Redis going away, for real: the test starts its own redis-server, serves the gateway with uvicorn on
a loopback port, kills Redis, and checks that every route that needs it answers 503 problem+json with
``Retry-After`` on a connection that stays open, that nothing is half-stored, and that the service
recovers when Redis is back."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from redis import Redis
from redis.exceptions import RedisError

from service.app import create_app
from service.settings import Settings
from tests.api.test_model_uploads import card, weights

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
JOB_ID = "0" * 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class RedisProcess:
    """A redis-server of our own on ``port``: start, kill (SIGKILL, as a crash), start again."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port, self.directory = port, directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, "redis-server to answer")

    def answers(self) -> bool:
        try:
            return bool(Redis(port=self.port, socket_timeout=1).ping())
        except RedisError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@pytest.fixture
def served(redis_server: RedisProcess, tmp_path: Path) -> Iterator[tuple[httpx.Client, Settings]]:
    """The gateway on a real socket (uvicorn in a thread), and a keep-alive client."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/0", var_dir=tmp_path / "var",
                        predict_timeout_s=5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, settings
    server.should_exit = True
    thread.join(timeout=30)


def npy_b64(n: int = 2) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((n, 1, 28, 28), np.float32))
    return base64.b64encode(buffer.getvalue()).decode()


def stored(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.blob_root.rglob("*") if p.is_file())


def queue_routes() -> list[tuple[str, str, dict[str, Any]]]:
    """Every route that needs Redis, with a request that would otherwise be accepted."""
    array = {"array": npy_b64()}
    return [
        ("GET", f"/v1/jobs/{JOB_ID}", {}),
        ("DELETE", f"/v1/jobs/{JOB_ID}", {}),
        ("GET", f"/v1/jobs/{JOB_ID}/artifacts/grid.png", {}),
        ("POST", "/v1/attacks", {"json": {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
                                          "inputs": array, "seed": 0}}),
        ("POST", "/v1/attacks", {"data": {"spec": '{"model": "fmnist-cnn", "attack": {"name": "fgsm", '
                                                  '"eps": 0.1}}'},
                                 "files": {"files": ("x.npy", base64.b64decode(array["array"]))}}),
        ("POST", "/v1/attacks", {"json": {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
                                          "inputs": array}, "headers": {"Idempotency-Key": "k1"}}),
        ("POST", "/v1/audits", {"json": {"model": "fmnist-cnn", "suite": "quick", "inputs": array}}),
        ("POST", "/v1/defenses", {"json": {"model": "fmnist-cnn", "defense": {
            "name": "preprocessing", "steps": [{"name": "bit-depth", "bits": 4}]}}}),
        ("POST", "/v1/attacks/generators", {"json": {"model": "fmnist-cnn", "epochs": 1}}),
        ("POST", "/v1/models", {"data": {"card": card(architecture="mlp")},
                                "files": {"weights": ("w.safetensors", weights())}}),
    ]


def test_redis_down_is_503_with_retry_after_on_an_open_connection_then_recovers(
    served: tuple[httpx.Client, Settings], redis_server: RedisProcess
) -> None:
    client, settings = served
    routes = queue_routes()
    redis_server.kill()
    before = stored(settings)
    for method, path, kwargs in routes:
        response = client.request(method, path, **kwargs)
        assert response.status_code == 503, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), (method, path)
        assert int(response.headers["retry-after"]) > 0
        assert response.json()["status"] == 503 and "Redis" in response.json()["detail"]
        assert response.headers.get("connection", "").lower() != "close", (method, path)
    # the Open Inference Protocol answers in its own error shape, with the same status and header
    infer = client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [
        {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]})
    assert infer.status_code == 503 and "error" in infer.json() and int(infer.headers["retry-after"]) > 0
    assert client.get("/readyz").status_code == 503
    assert stored(settings) == before == [], "an input or upload was stored for a job never queued"

    redis_server.start()  # same port, empty: the gateway reconnects by itself
    accepted = client.post("/v1/attacks", **routes[3][2])
    assert accepted.status_code == 202, accepted.text
    job = client.get(accepted.headers["location"])
    assert job.status_code == 200 and job.json()["status"] == "queued"
    assert client.get(f"/v1/jobs/{JOB_ID}").status_code == 404
    assert len(stored(settings)) == 1  # the accepted job's input, and only it
