"""Accounting: one row per job attempt (who, where, what it held, when, how it ended).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

The model is :class:`mlaas.platform.accounting.JobAttemptRow`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mlaas.platform.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("group", sa.String(255), nullable=False),
        sa.Column("queue", sa.String(255), nullable=True),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("gpus", sa.JSON, nullable=False),
        sa.Column("cpus", sa.Float, nullable=False),
        sa.Column("queued_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("ended_at", UTCDateTime, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.UniqueConstraint("job_id", "attempt", name="uq_job_attempts_job_attempt"),
    )
    op.create_index("ix_job_attempts_started", "job_attempts", ["started_at"])
    op.create_index("ix_job_attempts_user", "job_attempts", ["user"])
    op.create_index("ix_job_attempts_group", "job_attempts", ["group"])


def downgrade() -> None:
    op.drop_index("ix_job_attempts_group", table_name="job_attempts")
    op.drop_index("ix_job_attempts_user", table_name="job_attempts")
    op.drop_index("ix_job_attempts_started", table_name="job_attempts")
    op.drop_table("job_attempts")
