"""tasks(status, updated_at) includes id on PostgreSQL: running task ids from the index alone.

The owners report finds the running tasks' runs from the tasks' side; with the id in
the index that lookup never reads the table. SQLite's indexes carry the id already.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 12:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _rebuild(include_id=True)


def downgrade() -> None:
    _rebuild(include_id=False)


def _rebuild(include_id: bool) -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.drop_index("ix_tasks_status_updated_at", table_name="tasks")
    op.create_index(
        "ix_tasks_status_updated_at",
        "tasks",
        ["status", "updated_at"],
        postgresql_include=["id"] if include_id else [],
    )
