"""The history database: every job the service accepted, its final state, its result and, for audits,
a summary to compare versions with. Redis is the queue; this is the record.

SQLAlchemy 2 over SQLite (the default, a file in the var dir) or PostgreSQL; the schema is
Alembic's (``history/migrations``), applied when a process first opens the store. Torch-free:
the gateway reads it, the workers write it.
"""
