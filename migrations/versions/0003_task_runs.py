"""Task runs: the history of every run of a task, for the reports.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 09:28:06.765673
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("run_no", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=256), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("stop_reason", sa.SmallInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["task_pk"], ["tasks.id"], name=op.f("fk_task_runs_task_pk_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_runs")),
        sa.UniqueConstraint("task_pk", "run_no", name=op.f("uq_task_runs_task_pk_run_no")),
    )
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.create_index("ix_task_runs_ended_at", ["ended_at"], unique=False)
        batch_op.create_index("ix_task_runs_owner", ["owner"], unique=False)
        batch_op.create_index("ix_task_runs_started_at", ["started_at"], unique=False)

    # Tasks recorded before this revision keep their current run.
    op.execute(
        "INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason) "
        "SELECT id, runs, owner, started_at, ended_at, stop_reason FROM tasks WHERE runs > 0"
    )


def downgrade() -> None:
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_task_runs_started_at")
        batch_op.drop_index("ix_task_runs_owner")
        batch_op.drop_index("ix_task_runs_ended_at")

    op.drop_table("task_runs")
