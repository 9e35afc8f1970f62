"""Drop callback_nonces(seen_at): never read, and one more index write per callback.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25 13:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("callback_nonces", schema=None) as batch_op:
        batch_op.drop_index("ix_callback_nonces_seen_at")


def downgrade() -> None:
    with op.batch_alter_table("callback_nonces", schema=None) as batch_op:
        batch_op.create_index("ix_callback_nonces_seen_at", ["seen_at"], unique=False)
