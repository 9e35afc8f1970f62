"""`manager rebuild`: recompute tasks and their runs from their recorded events.

The same fold as every callback (manager/callbacks/rules.py), over every task's whole
history, a batch of tasks at a time: one query each for the batch's rows, events,
accepted stops and runs, the fold in Python, and writes only where something differs.
The batch's task rows are locked while it is worked on (but for a dry run, which
reads a snapshot), so callbacks arriving meanwhile wait for it (or it for them) and
the result is what their events make it. A task whose old events were pruned
(manager/callbacks/retention.py) is folded from the run that stands in for them and
the events received since (`fold_pruned`): its runs from before stay as they are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, inspect, select

from manager.callbacks.history import (
    ACCEPTED_STOP_COLUMNS,
    ACCEPTED_STOPS,
    EVENT_COLUMNS,
    IS_EVENT,
    RUN_COLUMNS,
    TASK_STATE,
    Mark,
    TaskState,
    accepted_stop_event,
    delivery_event,
    diff,
    fold_pruned,
    stored_run,
)
from manager.callbacks.outbound import pass_on as events_of
from manager.callbacks.rules import Event, History, Run, fold
from manager.callbacks.task_rows import write_back
from manager.models import Delivery, PrunedHistory, RunDay, StopRequest, Task, TaskRun

BATCH = 2000


@dataclass(frozen=True)
class TaskFigures:
    status: str
    runs: int
    transcoding_seconds: int


@dataclass(frozen=True)
class Rebuilt:
    """One task whose row or runs differed from its events' fold."""

    task_id: str
    before: TaskFigures
    after: TaskFigures


def rebuild(
    conn: Connection,
    *,
    task_id: str | None = None,
    dry_run: bool = False,
    now: datetime,
    batch: int = BATCH,
    pass_on: bool = True,
) -> Iterator[list[Rebuilt]]:
    """Each batch's changed tasks, once written (unless `dry_run`); the caller may commit
    between batches. After a change, daily's cache of final days (run_days) is emptied,
    since the runs it was worked out from have changed. With `pass_on`, each change
    emits its events (manager/callbacks/outbound.py), as any change of a task does."""
    after_pk = 0
    changed_any = False
    pruning = _knows_pruning(conn)
    while True:
        query = TASK_STATE.where(Task.id > after_pk)
        if task_id is not None:
            query = query.where(Task.task_id == task_id)
        query = query.order_by(Task.id).limit(batch)
        if not dry_run:  # a dry run reads a snapshot and holds no callback up
            query = query.with_for_update()
        rows = conn.execute(query).all()
        if not rows:
            break
        low, high = rows[0].id, rows[-1].id
        after_pk = high
        marks = _marks_between(conn, low, high) if pruning else {}
        events = _events_between(conn, low, high, marks)
        runs = _runs_between(conn, low, high)

        changed = []
        for row in rows:
            task = TaskState(*row)
            stored = runs[task.id]
            if task.id in marks:
                change = fold_pruned(task, stored, events[task.id], marks[task.id])
            else:
                change = diff(task, stored, fold(events[task.id]))
            if not change.changed:
                continue
            before = _figures(task.status, [stored_run(r) for r in stored], now)
            changed.append(Rebuilt(row.task_id, before, _figures_of(change.history, stored, now)))
            if not dry_run:
                emitted = events_of(task, change, at=now) if pass_on else []
                write_back(conn, task, change, emitted)
        if changed:
            changed_any = True
        yield changed
    if changed_any and not dry_run:
        conn.execute(delete(RunDay))


def _knows_pruning(conn: Connection) -> bool:
    """Whether the schema records pruned histories: not yet when migration 0013 runs
    this (0015 adds the table), and then no task can have been pruned."""
    return inspect(conn).has_table(PrunedHistory.__tablename__)


def _marks_between(conn: Connection, low: int, high: int) -> dict[int, Mark]:
    """The pruned_histories rows of the tasks whose ids are in [low, high]."""
    rows = conn.execute(
        select(
            PrunedHistory.task_pk,
            PrunedHistory.runs,
            PrunedHistory.start_seen,
            PrunedHistory.events_before,
        ).where(PrunedHistory.task_pk.between(low, high))
    )
    return {row.task_pk: Mark(row.runs, row.start_seen, row.events_before) for row in rows}


def _events_between(
    conn: Connection, low: int, high: int, marks: dict[int, Mark]
) -> dict[int, list[Event]]:
    """The recorded events of the tasks whose ids are in [low, high], by task id; of a
    pruned task, those received (or accepted) since its events were pruned."""
    events: dict[int, list[Event]] = defaultdict(list)
    for delivery in conn.execute(
        select(*EVENT_COLUMNS, Delivery.received_at).where(
            Delivery.task_pk.between(low, high), IS_EVENT
        )
    ):
        if _since_pruned(marks, delivery.task_pk, delivery.received_at):
            events[delivery.task_pk].append(delivery_event(delivery))
    for stop in conn.execute(
        ACCEPTED_STOPS.where(StopRequest.task_pk.between(low, high)).with_only_columns(
            *ACCEPTED_STOP_COLUMNS
        )
    ):
        if _since_pruned(marks, stop.task_pk, stop.attempted_at):
            events[stop.task_pk].append(accepted_stop_event(stop))
    return events


def _since_pruned(marks: dict[int, Mark], task_pk: int, at: datetime) -> bool:
    mark = marks.get(task_pk)
    return mark is None or mark.keeps(at)


def _runs_between(conn: Connection, low: int, high: int) -> dict[int, list[Any]]:
    """The stored runs of the tasks whose ids are in [low, high], by task id, in order."""
    runs: dict[int, list[Any]] = defaultdict(list)
    for run in conn.execute(
        select(*RUN_COLUMNS)
        .where(TaskRun.task_pk.between(low, high))
        .order_by(TaskRun.task_pk, TaskRun.run_no)
    ):
        runs[run.task_pk].append(run)
    return runs


def _figures_of(history: History, stored: list[Any], now: datetime) -> TaskFigures:
    """The task's figures after the fold: the stored runs before the first it folded."""
    earlier = [stored_run(r) for r in stored[: history.first_run]]
    return _figures(str(history.status), [*earlier, *history.runs], now)


def _figures(status: str, runs: list[Run], now: datetime) -> TaskFigures:
    seconds = 0.0
    for run in runs:
        if run.started_at is not None:
            end = now if run.ended_at is None else run.ended_at
            seconds += max((end - run.started_at).total_seconds(), 0.0)
    return TaskFigures(status, len(runs), round(seconds))
