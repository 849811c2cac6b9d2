"""The history tests' databases: SQLite in the test's temporary directory, and PostgreSQL on
127.0.0.1:5432 (``ADVERSA_TEST_POSTGRES_URL``; ``make test`` starts one), one fresh schema per test
in the ``adversa_test_h`` database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

POSTGRES_URL = os.environ.get("ADVERSA_TEST_POSTGRES_URL",
                              "postgresql://postgres:postgres@127.0.0.1:5432/adversa_test_h")
DATABASES = ["sqlite", "postgresql"]


def _admin(database: str) -> psycopg.Connection:
    url = make_url(POSTGRES_URL).set(drivername="postgresql", database=database)
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5)


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database of ``kind``; a PostgreSQL schema is dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'history.db'}"
        return
    name = make_url(POSTGRES_URL).database or "adversa_test_h"
    try:
        with _admin("postgres") as admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL does not answer at {make_url(POSTGRES_URL).render_as_string()} ({exc}); "
                    "`make postgres` installs and starts one")
    schema = f"t_{uuid.uuid4().hex}"
    with _admin(name) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"}) \
            .render_as_string(hide_password=False)
    finally:
        with _admin(name) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
