"""delivery_hours: deliveries per UTC hour and verdict, for hours that can no longer change.

summary counts the deliveries of a long window from these rows and only the hours at
its ends from deliveries itself. The rows are written by the reports as they need them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 12:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_hours",
        sa.Column("hour", sa.DateTime(), nullable=False),
        sa.Column("applied", sa.BigInteger(), nullable=False),
        sa.Column("duplicate", sa.BigInteger(), nullable=False),
        sa.Column("stale", sa.BigInteger(), nullable=False),
        sa.Column("rejected", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", name=op.f("pk_delivery_hours")),
    )


def downgrade() -> None:
    op.drop_table("delivery_hours")
