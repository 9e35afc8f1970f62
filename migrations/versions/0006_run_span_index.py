"""Run lengths in order, on PostgreSQL: summary's percentiles walk to a rank, no sort.

An expression index on (ended_at - started_at), with the columns it is computed from
included so that the walk reads the index alone. SQLite has no use for it: its
percentiles number the rows of the window.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.create_index(
        "ix_task_runs_span",
        "task_runs",
        [sa.text("(ended_at - started_at)")],
        postgresql_include=["started_at", "ended_at", "owner"],
    )


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.drop_index("ix_task_runs_span", table_name="task_runs")
