"""Indexes for the reports: covering indexes so their counts read only the index.

Two indexes grow a column and replace the narrower one they extend:
deliveries(received_at) → (received_at, verdict) and
task_runs(ended_at) → (ended_at, stop_reason, started_at).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 10:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_status_last_delivery_at", ["status", "last_delivery_at"], unique=False
        )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_received_at_verdict", ["received_at", "verdict"], unique=False
        )
        batch_op.drop_index("ix_deliveries_received_at")
    with op.batch_alter_table("stop_requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_stop_requests_created_at_state", ["created_at", "state"], unique=False
        )
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_task_runs_ended_at_stop_reason_started_at",
            ["ended_at", "stop_reason", "started_at"],
            unique=False,
        )
        batch_op.drop_index("ix_task_runs_ended_at")


def downgrade() -> None:
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.create_index("ix_task_runs_ended_at", ["ended_at"], unique=False)
        batch_op.drop_index("ix_task_runs_ended_at_stop_reason_started_at")
    with op.batch_alter_table("stop_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_stop_requests_created_at_state")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_deliveries_received_at", ["received_at"], unique=False)
        batch_op.drop_index("ix_deliveries_received_at_verdict")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_status_last_delivery_at")
