"""Covering indexes for the reports, each replacing a narrower one.

tasks(status, last_delivery_at) → (status, last_delivery_at, updated_at, first_seen_at):
summary counts tasks per status from the index alone.
deliveries(received_at, verdict) → (verdict, received_at): summary counts each verdict
as one range instead of grouping every delivery by a string.
task_runs(owner) → (owner, task_pk, started_at, ended_at, stop_reason): owners reads
runs from the index alone, already in (owner, task) order.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 11:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_status_last_delivery_at_updated_at_first_seen_at",
            ["status", "last_delivery_at", "updated_at", "first_seen_at"],
            unique=False,
        )
        batch_op.drop_index("ix_tasks_status_last_delivery_at")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_verdict_received_at", ["verdict", "received_at"], unique=False
        )
        batch_op.drop_index("ix_deliveries_received_at_verdict")
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_task_runs_owner_task_pk_started_at_ended_at_stop_reason",
            ["owner", "task_pk", "started_at", "ended_at", "stop_reason"],
            unique=False,
        )
        batch_op.drop_index("ix_task_runs_owner")


def downgrade() -> None:
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.create_index("ix_task_runs_owner", ["owner"], unique=False)
        batch_op.drop_index("ix_task_runs_owner_task_pk_started_at_ended_at_stop_reason")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_received_at_verdict", ["received_at", "verdict"], unique=False
        )
        batch_op.drop_index("ix_deliveries_verdict_received_at")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_status_last_delivery_at", ["status", "last_delivery_at"], unique=False
        )
        batch_op.drop_index("ix_tasks_status_last_delivery_at_updated_at_first_seen_at")
