"""run_days.ended_unseen: the runs of a day that ended without a stop callback.

daily counts them beside stopped and failed, so that the three add up to the runs
ended that day. The rows written so far lack the figure; they are only a cache of
final days, which daily writes again as it needs them, so they are deleted rather
than worked out here.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM run_days")
    # SQLite cannot ALTER TABLE … ADD COLUMN … NOT NULL without a default: copy the
    # (now empty) table instead.
    recreate = "always" if op.get_context().dialect.name == "sqlite" else "auto"
    with op.batch_alter_table("run_days", schema=None, recreate=recreate) as batch_op:
        batch_op.add_column(sa.Column("ended_unseen", sa.BigInteger(), nullable=False))


def downgrade() -> None:
    # The rows stay right without the column: their other figures do not change.
    with op.batch_alter_table("run_days", schema=None) as batch_op:
        batch_op.drop_column("ended_unseen")
