"""A task's row and its runs written back as a `Change` (manager/callbacks/history.py)
makes them.

`task_values` and `run_rows` are the change as parameters, which PostgreSQL's
one-statement paths (manager/callbacks/pg_statements.py) take too; `write_back`
writes them with portable statements built once (any backend): for callbacks on
SQLite, for `manager rebuild` and for accepted stops. `NEW_TASK` is a task's row
before its first delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Connection, DateTime, Table, bindparam, delete, update
from sqlalchemy.dialects import postgresql, sqlite

from manager.callbacks.history import STATE_FIELDS, TASK_STATE, Change, TaskState
from manager.callbacks.outbound import Emitted
from manager.callbacks.outbox import write_outbox
from manager.callbacks.rules import NO_POSITION
from manager.models import Task, TaskRun
from manager.vocabulary import TaskStatus

# What the rules may change: every column of TaskState but the key, the task's names
# and its details (written only when newer: manager/callbacks/deliveries.py).
WRITTEN = tuple(
    name for name in STATE_FIELDS if name not in ("id", "app_id", "task_id", "input", "outputs")
)
# A task's row before its first delivery.
NEW_TASK = {
    "status": TaskStatus.RUNNING,  # placeholder: a new task always applies its first delivery
    "state_seq": NO_POSITION[0],
    "state_rank": NO_POSITION[1],
    "max_seq": NO_POSITION[0],
    "runs": 0,
    "run_start_seen": False,
}


def task_values(task: TaskState, change: Change) -> dict[str, Any]:
    """The task row's columns after the change, the registers outside the fold included."""
    h = change.history
    last = h.last_run
    owner_seq, owner_rank = (None, None) if h.owner_position is None else h.owner_position
    return {
        "task_pk": task.id,
        "status": str(h.status),
        "stop_reason": None if last is None else last.stop_reason,
        "state_seq": h.position[0],
        "state_rank": h.position[1],
        "max_seq": task.max_seq,
        "owner_seq": owner_seq,
        "owner_rank": owner_rank,
        "owner": h.owner,
        "details_seq": task.details_seq,
        "details_rank": task.details_rank,
        "runs": h.run_count,
        "last_failure_at": h.last_failure_at,
        "run_start_seen": last is not None and last.start_seen,
        "started_at": None if last is None else last.started_at,
        "ended_at": None if last is None else last.ended_at,
        "updated_at": task.updated_at,
        "last_delivery_at": task.last_delivery_at,
        "version": task.version,
    }


def run_rows(task_pk: int, change: Change) -> list[dict[str, Any]]:
    return [
        {
            "run_task_pk": task_pk,
            "run_number": number,
            "run_owner": change.history.owner,
            "run_started_at": run.started_at,
            "run_ended_at": run.ended_at,
            "run_stop_reason": run.stop_reason,
        }
        for number, run in change.runs
    ]


def write_back(
    conn: Connection, task: TaskState, change: Change, emitted: Sequence[Emitted] = ()
) -> None:
    """Write the task, its changed runs and the events it emitted with portable
    statements (any backend)."""
    conn.execute(WRITE_BACK_TASK, task_values(task, change))
    _write_runs(conn, task.id, change)
    if emitted:
        write_outbox(conn, task.id, change.history.owner, emitted)


def _write_runs(conn: Connection, task_pk: int, change: Change) -> None:
    rows = run_rows(task_pk, change)
    if rows:
        conn.execute(UPSERT_RUN[conn.dialect.name], rows)
    if change.owner_changed:
        conn.execute(_SET_RUN_OWNERS, {"run_task_pk": task_pk, "owner": change.history.owner})
    if change.full:
        conn.execute(
            _DELETE_RUNS_AFTER, {"run_task_pk": task_pk, "count": change.history.run_count}
        )


def lock_task(conn: Connection, task_pk: int) -> TaskState | None:
    """The task's row, locked for the rest of the transaction (FOR UPDATE on PostgreSQL)."""
    row = conn.execute(_LOCK_TASK, {"task_pk": task_pk}).first()
    return None if row is None else TaskState(*row)


# --- statements, built once ---------------------------------------------------------

_TASKS = cast(Table, Task.__table__)
_RUNS = cast(Table, TaskRun.__table__)

_LOCK_TASK = TASK_STATE.where(_TASKS.c.id == bindparam("task_pk")).with_for_update()
WRITE_BACK_TASK = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("task_pk"))
    .values({name: bindparam(name) for name in WRITTEN})
)
_RUN_COLUMNS = {
    "task_pk": bindparam("run_task_pk"),
    "run_no": bindparam("run_number"),
    "owner": bindparam("run_owner"),
    "started_at": bindparam("run_started_at", type_=DateTime()),
    "ended_at": bindparam("run_ended_at", type_=DateTime()),
    "stop_reason": bindparam("run_stop_reason"),
}


def _upsert_run(dialect_insert: Any) -> Any:
    statement = dialect_insert(_RUNS).values(_RUN_COLUMNS)
    return statement.on_conflict_do_update(
        index_elements=[_RUNS.c.task_pk, _RUNS.c.run_no],
        set_={c: statement.excluded[c] for c in ("owner", "started_at", "ended_at", "stop_reason")},
    )


UPSERT_RUN = {"sqlite": _upsert_run(sqlite.insert), "postgresql": _upsert_run(postgresql.insert)}
_SET_RUN_OWNERS = (
    update(_RUNS)
    .where(_RUNS.c.task_pk == bindparam("run_task_pk"))
    .values(owner=bindparam("owner"))
)
_DELETE_RUNS_AFTER = delete(_RUNS).where(
    _RUNS.c.task_pk == bindparam("run_task_pk"), _RUNS.c.run_no > bindparam("count")
)
