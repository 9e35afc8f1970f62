"""Delivery retention: raw bodies may be dropped, and pruned histories are recorded.

Past DELIVERY_RETENTION_DAYS, manager/callbacks/retention.py drops the raw body of a
delivery (`deliveries.raw_body` may now be NULL; the parsed columns stay) and deletes
the deliveries nothing needs any more. When it deletes the events of a task that
ended long ago, `pruned_histories` records it: the deliveries received before
`events_before` are gone, and the task's run `runs` (its last then) stands in for
them when its history is folded again.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pruned_histories",
        sa.Column("task_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("start_seen", sa.Boolean(), nullable=False),
        sa.Column("events_before", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_pk"],
            ["tasks.id"],
            name=op.f("fk_pruned_histories_task_pk_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_pk", name=op.f("pk_pruned_histories")),
    )
    # On SQLite, batch mode copies `deliveries`, which nothing references: safe (unlike
    # `tasks`, whose copy would drop the old table and cascade, see 0013).
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.alter_column("raw_body", existing_type=sa.LargeBinary(), nullable=True)


def downgrade() -> None:
    # A dropped body cannot come back: an empty one takes its place.
    op.execute(
        sa.text("UPDATE deliveries SET raw_body = :empty WHERE raw_body IS NULL").bindparams(
            sa.bindparam("empty", b"", type_=sa.LargeBinary())
        )
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.alter_column("raw_body", existing_type=sa.LargeBinary(), nullable=False)
    op.drop_table("pruned_histories")
