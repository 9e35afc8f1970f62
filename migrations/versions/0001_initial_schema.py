"""Initial schema: tasks, deliveries, the callback nonce ledger and API tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 09:00:02.447296
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "callback_nonces",
        sa.Column("zego_timestamp", sa.BigInteger(), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("zego_timestamp", "nonce", name=op.f("pk_callback_nonces")),
    )
    with op.batch_alter_table("callback_nonces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_callback_nonces_seen_at"), ["seen_at"], unique=False)

    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("app_id", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.String(length=256), nullable=False),
        sa.Column("owner", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stop_reason", sa.SmallInteger(), nullable=True),
        sa.Column("state_seq", sa.BigInteger(), nullable=False),
        sa.Column("state_rank", sa.SmallInteger(), nullable=False),
        sa.Column("max_seq", sa.BigInteger(), nullable=False),
        sa.Column("owner_seq", sa.BigInteger(), nullable=True),
        sa.Column("owner_rank", sa.SmallInteger(), nullable=True),
        sa.Column("details_seq", sa.BigInteger(), nullable=True),
        sa.Column("details_rank", sa.SmallInteger(), nullable=True),
        sa.Column("input", sa.JSON(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("run_floor_seq", sa.BigInteger(), nullable=False),
        sa.Column("run_start_seq", sa.BigInteger(), nullable=True),
        sa.Column("run_start_rank", sa.SmallInteger(), nullable=True),
        sa.Column("end_seq", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("last_delivery_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'stopping', 'stopped', 'failed')", name=op.f("ck_tasks_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("app_id", "task_id", name=op.f("uq_tasks_app_id_task_id")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tasks_owner", ["owner"], unique=False)
        batch_op.create_index("ix_tasks_status_updated_at", ["status", "updated_at"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("event_key", sa.String(length=64), nullable=True),
        sa.Column("task_pk", sa.Integer(), nullable=True),
        sa.Column("app_id", sa.BigInteger(), nullable=True),
        sa.Column("event", sa.String(length=32), nullable=True),
        sa.Column("task_id", sa.String(length=256), nullable=True),
        sa.Column("user_id", sa.String(length=256), nullable=True),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("stop_reason", sa.SmallInteger(), nullable=True),
        sa.Column("zego_timestamp", sa.BigInteger(), nullable=True),
        sa.Column("nonce", sa.String(length=128), nullable=True),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.Column("body_size", sa.Integer(), nullable=False),
        sa.Column("raw_body", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint(
            "verdict IN ('applied', 'duplicate', 'stale', 'rejected')",
            name=op.f("ck_deliveries_verdict"),
        ),
        sa.ForeignKeyConstraint(
            ["task_pk"], ["tasks.id"], name=op.f("fk_deliveries_task_pk_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint("event_key", name=op.f("uq_deliveries_event_key")),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_deliveries_received_at", ["received_at"], unique=False)
        batch_op.create_index("ix_deliveries_task_pk_id", ["task_pk", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_task_pk_id")
        batch_op.drop_index("ix_deliveries_received_at")

    op.drop_table("deliveries")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_status_updated_at")
        batch_op.drop_index("ix_tasks_owner")

    op.drop_table("tasks")
    with op.batch_alter_table("callback_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_callback_nonces_seen_at"))

    op.drop_table("callback_nonces")
    op.drop_table("api_tokens")
