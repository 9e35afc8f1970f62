"""run_days: daily's figures per UTC day, for days that can no longer change.

daily takes the whole days of a long window from these rows and works out only the
rest from the runs. The rows are written by the report as it needs them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25 12:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_days",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("started", sa.BigInteger(), nullable=False),
        sa.Column("stopped", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("busy_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", name=op.f("pk_run_days")),
    )


def downgrade() -> None:
    op.drop_table("run_days")
