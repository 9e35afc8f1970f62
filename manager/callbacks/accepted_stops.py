"""Our own stop requests that ZEGOCLOUD accepted, as events of their tasks.

A stop attempt is recorded (manager/stops/attempts.py) before its task moves; then
`apply_accepted_stops` moves the tasks on as the rules say, by `extend` where the row
alone can tell, else by a fold of the task's whole history
(manager/callbacks/history.py), and writes them back (manager/callbacks/task_rows.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam

from manager.callbacks.history import (
    TASK_STATE,
    Change,
    TaskState,
    advance,
    extended,
    history_of,
)
from manager.callbacks.outbound import Emitted, pass_on
from manager.callbacks.outbox import write_outbox
from manager.callbacks.rules import Event, Rank, extend
from manager.callbacks.task_rows import (
    UPSERT_RUN,
    WRITE_BACK_TASK,
    run_rows,
    task_values,
    write_back,
)
from manager.models import Task


def apply_accepted_stops(
    conn: Connection, accepted: Sequence[tuple[int, int]], at: datetime
) -> int:
    """Move tasks on by our stop requests that ZEGOCLOUD accepted (already recorded as
    successful attempts): (task id, Sequence) pairs. Returns how many tasks changed.

    A handful of statements whatever their number: the tasks are locked in one, in id
    order as every path that locks several does, and written back in one executemany
    (runs in another). Only a task that `extend` cannot move on alone (rare for a
    stop) is refolded from its events, on its own.
    """
    if not accepted:
        return 0
    latest: dict[int, int] = {}
    for task_pk, sequence in accepted:
        latest[task_pk] = max(sequence, latest.get(task_pk, sequence))
    tasks = [TaskState(*row) for row in conn.execute(_LOCK_TASKS, {"task_pks": sorted(latest)})]
    written: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    events: list[tuple[int, str | None, list[Emitted]]] = []
    for task in tasks:
        event = Event(Rank.STOP_REQUEST, latest[task.id], at)
        after = extend(history_of(task), event)
        if after is None:  # the whole history decides: one task at a time
            change = advance(conn, task, event, stored=True)
            if change.changed:
                _stop_fields(task, change, latest[task.id], at)
                write_back(conn, task, change, pass_on(task, change, at=at))
            continue
        change = extended(history_of(task), after)
        if change.owner_changed:  # not from a stop, which names no owner; but if so
            _stop_fields(task, change, latest[task.id], at)
            write_back(conn, task, change, pass_on(task, change, at=at))
        elif change.changed:
            _stop_fields(task, change, latest[task.id], at)
            events.append((task.id, change.history.owner, pass_on(task, change, at=at)))
            written.append(task_values(task, change))
            runs += run_rows(task.id, change)
    if written:
        conn.execute(WRITE_BACK_TASK, written)
    if runs:
        conn.execute(UPSERT_RUN[conn.dialect.name], runs)
    for task_pk, owner, emitted in events:
        write_outbox(conn, task_pk, owner, emitted)
    return len(written)


def _stop_fields(task: TaskState, change: Change, sequence: int, at: datetime) -> None:
    """The task's registers outside the fold, moved on by an accepted stop."""
    if change.history.status != task.status:
        # A re-stop of a task already stopping leaves when it became stopping,
        # which the stuck report shows and the re-stops wait from.
        task.updated_at = at
    task.max_seq = max(task.max_seq, sequence)


_TASKS = cast(Table, Task.__table__)
_LOCK_TASKS = (
    TASK_STATE.where(_TASKS.c.id.in_(bindparam("task_pks", expanding=True)))
    .order_by(_TASKS.c.id)
    .with_for_update()
)
