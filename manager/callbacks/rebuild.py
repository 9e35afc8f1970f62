"""`manager rebuild`: recompute tasks and their runs from their recorded events.

The same fold as every callback (manager/callbacks/rules.py), over every task's whole
history, a batch of tasks at a time: one query each for the batch's rows, events,
accepted stops and runs, the fold in Python, and writes only where something differs.
The batch's task rows are locked while it is worked on (but for a dry run, which
reads a snapshot), so callbacks arriving meanwhile wait for it (or it for them) and
the result is what their events make it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select

from manager.callbacks.history import (
    ACCEPTED_STOP_COLUMNS,
    ACCEPTED_STOPS,
    EVENT_COLUMNS,
    IS_EVENT,
    RUN_COLUMNS,
    TASK_STATE,
    TaskState,
    accepted_stop_event,
    delivery_event,
    diff,
    stored_run,
)
from manager.callbacks.rules import Event, History, Run, fold
from manager.callbacks.task_rows import write_back
from manager.models import Delivery, RunDay, StopRequest, Task, TaskRun

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
) -> Iterator[list[Rebuilt]]:
    """Each batch's changed tasks, once written (unless `dry_run`); the caller may commit
    between batches. After a change, daily's cache of final days (run_days) is emptied,
    since the runs it was worked out from have changed."""
    after_pk = 0
    changed_any = False
    while True:
        query = TASK_STATE.add_columns(Task.task_id).where(Task.id > after_pk)
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
        events = _events_between(conn, low, high)
        runs = _runs_between(conn, low, high)

        changed = []
        for row in rows:
            task = TaskState(*tuple(row)[:-1])
            after = fold(events[task.id])
            change = diff(task, runs[task.id], after)
            if not change.changed:
                continue
            before = _figures(task.status, [stored_run(r) for r in runs[task.id]], now)
            changed.append(Rebuilt(row.task_id, before, _figures_of(after, now)))
            if not dry_run:
                write_back(conn, task, change)
        if changed:
            changed_any = True
        yield changed
    if changed_any and not dry_run:
        conn.execute(delete(RunDay))


def _events_between(conn: Connection, low: int, high: int) -> dict[int, list[Event]]:
    """The recorded events of the tasks whose ids are in [low, high], by task id."""
    events: dict[int, list[Event]] = defaultdict(list)
    for delivery in conn.execute(
        select(*EVENT_COLUMNS).where(Delivery.task_pk.between(low, high), IS_EVENT)
    ):
        events[delivery.task_pk].append(delivery_event(delivery))
    for stop in conn.execute(
        ACCEPTED_STOPS.where(StopRequest.task_pk.between(low, high)).with_only_columns(
            *ACCEPTED_STOP_COLUMNS
        )
    ):
        events[stop.task_pk].append(accepted_stop_event(stop))
    return events


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


def _figures_of(history: History, now: datetime) -> TaskFigures:
    return _figures(str(history.status), list(history.runs), now)


def _figures(status: str, runs: list[Run], now: datetime) -> TaskFigures:
    seconds = 0.0
    for run in runs:
        if run.started_at is not None:
            end = now if run.ended_at is None else run.ended_at
            seconds += max((end - run.started_at).total_seconds(), 0.0)
    return TaskFigures(status, len(runs), round(seconds))
