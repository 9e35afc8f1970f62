"""Leased units of the rate limit replace the shared slot; a queued stop says why it waits.

`rate_units` holds the units each process leases and paces on its own clock
(manager/ratelimit.py); `rate_limiters`, the single next-slot row every call
reserved from, goes. `stop_requests.wait_reason` tells an operator why a queued
request has not gone out: no share of the rate limit in time, or ZEGOCLOUD not
reached.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 23:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WAIT_REASONS = "wait_reason IN ('rate_limit', 'zego_unreachable')"


def upgrade() -> None:
    op.create_table(
        "rate_units",
        sa.Column("limiter", sa.String(length=64), nullable=False),
        sa.Column("unit", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=32), nullable=True),
        sa.Column("lease_until", sa.Float(precision=53), nullable=True),
        sa.Column("free_at", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("limiter", "unit", name=op.f("pk_rate_units")),
    )
    op.drop_table("rate_limiters")
    if op.get_context().dialect.name == "sqlite":
        # A column constraint in place: recreating stop_requests (batch mode) would
        # drop the table, and with it, through ON DELETE CASCADE, every attempt.
        op.execute(
            "ALTER TABLE stop_requests ADD COLUMN wait_reason VARCHAR(32) "
            f"CONSTRAINT ck_stop_requests_wait_reason CHECK ({WAIT_REASONS})"
        )
    else:
        op.add_column("stop_requests", sa.Column("wait_reason", sa.String(32), nullable=True))
        op.create_check_constraint(
            op.f("ck_stop_requests_wait_reason"), "stop_requests", WAIT_REASONS
        )


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        op.execute("ALTER TABLE stop_requests DROP COLUMN wait_reason")
    else:
        op.drop_constraint(op.f("ck_stop_requests_wait_reason"), "stop_requests")
        op.drop_column("stop_requests", "wait_reason")
    op.create_table(
        "rate_limiters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_slot", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rate_limiters")),
    )
    op.drop_table("rate_units")
