"""`adversa serve` as a user runs it: embedded Redis, a worker, the gateway; SIGTERM stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from models.manifest import HOSTED_DIR, CardIndex
from tests.conftest import REPO
from tests.integration.conftest import free_port


def redis_servers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"}


def test_serve_starts_everything_and_sigterm_leaves_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ADVERSA_REDIS_URL")}
    env.update({"ADVERSA_VAR_DIR": str(tmp_path / "var"), "PYTHONPATH": str(REPO)})
    port = free_port()
    before = redis_servers()
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                             env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        children = {p.pid for p in psutil.Process(serve.pid).children(recursive=True)}
        embedded = redis_servers() - before
        assert children, "expected a worker process"
        assert embedded, "expected an embedded redis-server"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["models"]
        hosted = CardIndex([HOSTED_DIR]).names()
        assert [m["name"] for m in models] == hosted and {"fmnist-cnn", "fmnist-resnet18"} <= set(hosted)

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        time.sleep(0.5)
        left = [pid for pid in children | embedded if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left behind: {left}"
        # The embedded Redis kept its data on disk for the next start.
        assert (tmp_path / "var" / "redis.db").exists() or any((tmp_path / "var").glob("*.aof*"))
    finally:
        if serve.poll() is None:
            serve.kill()
