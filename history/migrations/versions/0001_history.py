"""jobs, results and audit summaries

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
    )
    op.create_index("ix_jobs_team_created", "jobs", ["team", "created_at", "id"])
    op.create_table(
        "results",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("result", JSON, nullable=False),
    )
    op.create_table(
        "audits",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("suite", sa.String(32), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("clean_accuracy", sa.Float(), nullable=True),
        sa.Column("robust_accuracy", JSON, nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("gate", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_audits_team_model", "audits", ["team", "model_name", "created_at"])


def downgrade() -> None:
    op.drop_table("audits")
    op.drop_table("results")
    op.drop_table("jobs")
