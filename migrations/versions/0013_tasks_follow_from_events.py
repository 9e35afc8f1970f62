"""Tasks and runs follow from their events: one home for the rules, histories rebuilt.

The ordering rules now live only in manager/callbacks/rules.py, as a fold of a task's
events, so PostgreSQL's copy of them, manager_apply_callback(), goes, and so do the
columns its special cases kept (run_floor_seq, run_start_seq, run_start_rank,
end_seq). `last_failure_at` is the latest Timestamp of a task's StopReason 1 stops,
which are placed by Timestamp; `run_start_seen` tells whether the current run's start
came. Then every task and its runs are recomputed from the stored events, so that
histories recorded under the old, order-dependent rules are corrected.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 20:00:00.000000
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_FUNCTION = (
    "manager_apply_callback(bigint, varchar, varchar, varchar, bigint, varchar, smallint,"
    " bigint, varchar, varchar, varchar, smallint, boolean, timestamp, json, json,"
    " timestamp, varchar, integer, bytea)"
)


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {OLD_FUNCTION}")
    # Plain ALTER TABLE, never batch mode: on SQLite that copies `tasks` and drops the
    # old table, and with foreign keys on, the drop cascades to every delivery, run and
    # stop request of the tasks.
    op.add_column("tasks", sa.Column("last_failure_at", sa.DateTime(), nullable=True))
    op.add_column(
        "tasks",
        sa.Column("run_start_seen", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # Rank 2 was TranscodeStarted's.
    op.execute(
        "UPDATE tasks SET run_start_seen = (run_start_rank IS NOT NULL AND run_start_rank = 2)"
    )
    for column in ("run_floor_seq", "run_start_seq", "run_start_rank", "end_seq"):
        op.drop_column("tasks", column)
    _rebuild(op.get_bind())


def _rebuild(conn: sa.Connection) -> None:
    """Every task recomputed by the service's own fold (what `manager rebuild` runs).

    It uses the service's code, so it reads the columns the models have: a later
    migration that adds a column to tasks, deliveries, task_runs, stop_requests or
    stop_attempts must keep this step working (give the new column a default the
    models know, or make this step select only the columns of revision 0013).
    """
    from manager.callbacks.rebuild import rebuild
    from manager.clock import utcnow

    # tasks.version (0016) is read and written by the service's code: here for the
    # step only. Nothing is passed on: there are no subscriptions before 0016.
    borrowed = "version" not in {c["name"] for c in sa.inspect(conn).get_columns("tasks")}
    if borrowed:
        op.add_column("tasks", sa.Column("version", sa.BigInteger(), server_default="0"))
    for _changed in rebuild(conn, now=utcnow(), pass_on=False):
        pass
    if borrowed:
        op.drop_column("tasks", "version")


def downgrade() -> None:
    op.add_column(
        "tasks", sa.Column("run_floor_seq", sa.BigInteger(), nullable=False, server_default="-1")
    )
    op.add_column("tasks", sa.Column("run_start_seq", sa.BigInteger(), nullable=True))
    op.add_column("tasks", sa.Column("run_start_rank", sa.SmallInteger(), nullable=True))
    op.add_column("tasks", sa.Column("end_seq", sa.BigInteger(), nullable=True))
    op.drop_column("tasks", "last_failure_at")
    op.drop_column("tasks", "run_start_seen")
    # The old rules' registers cannot be recovered exactly; the old function comes back
    # as migration 0011 made it.
    if op.get_context().dialect.name == "postgresql":
        _revision_0011().upgrade()


def _revision_0011() -> object:
    path = Path(__file__).with_name("0011_apply_callback_function.py")
    spec = importlib.util.spec_from_file_location("revision_0011", path)
    assert spec is not None  # noqa: S101 - a file beside this one
    assert spec.loader is not None  # noqa: S101
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
