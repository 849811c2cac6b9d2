"""Alembic's environment: runs on the connection ``HistoryStore.upgrade`` passes in (already inside
its locked transaction), so two processes starting at once migrate one after the other."""

from __future__ import annotations

from alembic import context

from history.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
