"""Outbound events: subscriptions, the events and their outbox, the delivery log.

A task's changes emit events (manager/callbacks/outbound.py) with a version per task
(`tasks.version`), written with the change to `events`, one `event_sends` row per
subscription that takes it; `manager worker` sends them (manager/events/) and records
every attempt in `event_attempts`.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 04:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("event_types", sa.String(length=512), nullable=True),
        sa.Column("owner", sa.String(length=256), nullable=True),
        sa.Column("secret_encrypted", sa.String(length=512), nullable=False),
        sa.Column("previous_secret_encrypted", sa.String(length=512), nullable=True),
        sa.Column("previous_secret_until", sa.DateTime(), nullable=True),
        sa.Column("description", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("disabled_at", sa.DateTime(), nullable=True),
        sa.Column("disabled_reason", sa.String(length=500), nullable=True),
        sa.Column("failing_since", sa.DateTime(), nullable=True),
        sa.Column("last_success_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "type IN ('task.started', 'task.updated', 'task.stopping', 'task.stopped',"
            " 'task.failed', 'run.ended', 'task.revised')",
            name=op.f("ck_events_type"),
        ),
        sa.ForeignKeyConstraint(
            ["task_pk"], ["tasks.id"], name=op.f("fk_events_task_pk_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("task_pk", "version", name=op.f("uq_events_task_pk_version")),
    )
    op.create_table(
        "event_sends",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("subscription_id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_until", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("replayed_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')", name=op.f("ck_event_sends_state")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["events.id"],
            name=op.f("fk_event_sends_event_id_events"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_event_sends_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_sends")),
        sa.UniqueConstraint(
            "subscription_id", "event_id", name=op.f("uq_event_sends_subscription_id_event_id")
        ),
    )
    op.create_index("ix_event_sends_event_id", "event_sends", ["event_id"], unique=False)
    op.create_index(
        "ix_event_sends_pending_due",
        "event_sends",
        ["next_attempt_at", "id"],
        unique=False,
        sqlite_where=sa.text("state = 'pending'"),
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_event_sends_pending_line",
        "event_sends",
        ["subscription_id", "task_pk", "version"],
        unique=False,
        sqlite_where=sa.text("state = 'pending'"),
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_table(
        "event_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("send_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("attempted_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(length=256), nullable=True),
        sa.Column("answer", sa.String(length=512), nullable=True),
        sa.Column("elapsed_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["send_id"],
            ["event_sends.id"],
            name=op.f("fk_event_attempts_send_id_event_sends"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_attempts")),
    )
    op.create_index("ix_event_attempts_send_id", "event_attempts", ["send_id"], unique=False)
    # Plain ALTER TABLE, never batch mode (see 0013).
    op.add_column(
        "tasks", sa.Column("version", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )


def downgrade() -> None:
    op.drop_column("tasks", "version")
    op.drop_table("event_attempts")
    op.drop_table("event_sends")
    op.drop_table("events")
    op.drop_table("subscriptions")
