"""Stop requests, their attempts, bulk batches and the shared rate limiter.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 09:15:00.117828
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_limiters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_slot", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rate_limiters")),
    )
    op.create_table(
        "stop_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stop_batches")),
    )
    op.create_table(
        "stop_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("force", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_until", sa.DateTime(), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("last_code", sa.BigInteger(), nullable=True),
        sa.Column("last_message", sa.String(length=500), nullable=True),
        sa.Column("last_request_id", sa.String(length=128), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'succeeded', 'failed')", name=op.f("ck_stop_requests_state")
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["stop_batches.id"],
            name=op.f("fk_stop_requests_batch_id_stop_batches"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["task_pk"],
            ["tasks.id"],
            name=op.f("fk_stop_requests_task_pk_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stop_requests")),
    )
    with op.batch_alter_table("stop_requests", schema=None) as batch_op:
        batch_op.create_index("ix_stop_requests_batch_id", ["batch_id"], unique=False)
        batch_op.create_index(
            "ix_stop_requests_state_next_attempt_at", ["state", "next_attempt_at"], unique=False
        )
        batch_op.create_index("ix_stop_requests_task_pk", ["task_pk"], unique=False)
        batch_op.create_index(
            "uq_stop_requests_queued_task",
            ["task_pk"],
            unique=True,
            sqlite_where=sa.text("state = 'queued'"),
            postgresql_where=sa.text("state = 'queued'"),
        )

    op.create_table(
        "stop_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("stop_request_id", sa.Integer(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("code", sa.BigInteger(), nullable=True),
        sa.Column("message", sa.String(length=500), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("elapsed_ms", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "outcome IN ('success', 'retryable', 'permanent')",
            name=op.f("ck_stop_attempts_outcome"),
        ),
        sa.ForeignKeyConstraint(
            ["stop_request_id"],
            ["stop_requests.id"],
            name=op.f("fk_stop_attempts_stop_request_id_stop_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stop_attempts")),
    )
    with op.batch_alter_table("stop_attempts", schema=None) as batch_op:
        batch_op.create_index("ix_stop_attempts_stop_request_id", ["stop_request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stop_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_stop_attempts_stop_request_id")

    op.drop_table("stop_attempts")
    with op.batch_alter_table("stop_requests", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_stop_requests_queued_task",
            sqlite_where=sa.text("state = 'queued'"),
            postgresql_where=sa.text("state = 'queued'"),
        )
        batch_op.drop_index("ix_stop_requests_task_pk")
        batch_op.drop_index("ix_stop_requests_state_next_attempt_at")
        batch_op.drop_index("ix_stop_requests_batch_id")

    op.drop_table("stop_requests")
    op.drop_table("stop_batches")
    op.drop_table("rate_limiters")
