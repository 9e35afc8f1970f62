"""The summary report (SPEC 3.4): task states, runs started and ended, failure rate, run
durations, stop requests and deliveries, over a window.

Computed by SQL aggregation on SQLite and PostgreSQL alike; takes a Session, never
commits. Durations are exact microseconds, rounded in Python (manager/reports/dialect.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import ColumnElement, Engine, case, func, null, select
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import (
    STOP_STATES,
    TASK_STATUSES,
    VERDICTS,
    Delivery,
    StopRequest,
    Task,
    TaskRun,
)
from manager.reports import rollups
from manager.reports.dialect import US, Dialect, Query, ts
from manager.reports.queries import (
    FAILED,
    RUN_ENDED_UNSEEN,
    RUN_FAILED,
    counts,
    counts_each,
    runs_in,
)
from manager.reports.window import Window
from manager.vocabulary import TaskStatus

Durations: TypeAlias = dict[str, float | None]
# Runs ended in the window: how many, how many failed, how many ended unseen, durations.
EndedRuns: TypeAlias = tuple[int, int, int, Durations]

PERCENTILES = (50, 95)


def summary(
    session: Session,
    window: Window | None = None,
    owner: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Task states, runs started/ended, failure rate, run durations, stops and deliveries.

    `tasks` counts the tasks with a run that overlaps the window, the runs `owners`
    reports on, by their status now; `ended` = stopped + failed + `ended_unseen`.
    """
    window = window or Window()
    now = now or utcnow()
    sql = Dialect(session)  # first: on PostgreSQL it sets up the transaction
    tasks = _tasks_by_status(session, window, now, owner)
    started = _runs_started(session, window, owner)
    ended, failed, unseen, durations = _ended_runs(session, sql, window, owner)
    stops = _stop_requests(session, window, owner)
    if owner is None:
        verdicts = _delivery_counts(session, window, now)
    else:
        owned = select(Task.id).where(Task.owner == owner).scalar_subquery()
        in_window = [window.contains(Delivery.received_at), Delivery.task_pk.in_(owned)]
        verdicts = counts_each(session, Delivery.verdict, VERDICTS, in_window)
    return {
        "tasks": tasks,
        "started": started,
        "ended": ended,
        "ended_unseen": unseen,
        "failure_rate": round(failed / ended, 4) if ended else 0,
        "duration_seconds": durations,
        "stop_requests": {state: stops.get(state, 0) for state in STOP_STATES},
        "deliveries": verdicts,
    }


def _tasks_by_status(
    session: Session, window: Window, now: datetime, owner: str | None
) -> dict[str, int]:
    """Tasks with a run in the window (the runs `owners` reports on), by status, and all.

    Joining every run of a long window to its task costs more than the rest of summary
    together, so the tasks are counted from the runs alone, and only the few that are
    not `stopped` (the status most tasks end in) are looked up, each status a range of
    the index that leads with it. Every run has its task and every task one of the
    statuses (a foreign key and a check constraint): the stopped ones are the rest.
    """
    total_query = runs_in(select(func.count(TaskRun.task_pk.distinct())), window, now, owner)
    total = int(session.execute(total_query).scalar_one())
    has_run = runs_in(select(TaskRun.id), window, now, owner).where(TaskRun.task_pk == Task.id)
    others = tuple(status for status in TASK_STATUSES if status != TaskStatus.STOPPED)
    by_status = counts_each(session, Task.status, others, [has_run.exists()])
    by_status[TaskStatus.STOPPED] = total - sum(by_status.values())
    return {**{status: by_status[status] for status in TASK_STATUSES}, "total": total}


def _runs_started(session: Session, window: Window, owner: str | None) -> int:
    """Runs started in the window."""
    query = select(func.count()).where(window.contains(TaskRun.started_at))
    if owner is not None:
        query = query.where(TaskRun.owner == owner)
    return int(session.execute(query).scalar_one())


def _stop_requests(session: Session, window: Window, owner: str | None) -> dict[str, int]:
    """Stop requests made in the window, by state (only the states that have any)."""
    query = select(StopRequest.state, func.count()).group_by(StopRequest.state)
    query = query.where(window.contains(StopRequest.created_at))
    if owner is not None:
        query = query.where(StopRequest.user_id == owner)
    return counts(session, query)


def _delivery_counts(session: Session, window: Window, now: datetime) -> dict[str, int]:
    """Deliveries per verdict: whole final hours from delivery_hours, the ends counted."""
    bind = session.get_bind()
    hours = (
        rollups.hour_counts(bind, window.since, window.until, now)
        if isinstance(bind, Engine)
        else None
    )
    if hours is None:
        in_window = [window.contains(Delivery.received_at)]
        return counts_each(session, Delivery.verdict, VERDICTS, in_window)
    before = [Delivery.received_at < ts(hours.start)]
    after = [Delivery.received_at >= ts(hours.end)]
    if window.since is not None:
        before.append(Delivery.received_at >= ts(window.since))
    if window.until is not None:
        after.append(Delivery.received_at < ts(window.until))
    ends = counts_each(session, Delivery.verdict, VERDICTS, before, after)
    return {verdict: ends[verdict] + hours.counts[verdict] for verdict in VERDICTS}


def _ended_runs(session: Session, sql: Dialect, window: Window, owner: str | None) -> EndedRuns:
    """Runs ended in the window: how many, how many failed, how many ended unseen, and
    their durations.

    Percentiles are nearest-rank: the value at rank ceil(p/100 * n) of the n durations
    in ascending order. PostgreSQL reads each rank off its index on the run length;
    SQLite picks the ranks out with ROW_NUMBER(). Both give exact microseconds.
    """
    conditions = [window.contains(TaskRun.ended_at)]
    if owner is not None:
        conditions.append(TaskRun.owner == owner)
    if sql.pg:
        return _ended_runs_pg(session, sql, conditions)
    return _ended_runs_sqlite(session, sql, conditions)


def _no_durations() -> Durations:
    return {"mean": None, "p50": None, "p95": None}


def _ranks(timed: int) -> dict[int, int]:
    """The nearest rank, ceil(p/100 * n), of each percentile of `timed` durations."""
    return {percent: (percent * timed + 99) // 100 for percent in PERCENTILES}


def _ended_runs_sqlite(
    session: Session, sql: Dialect, conditions: list[ColumnElement[bool]]
) -> EndedRuns:
    # A stop may carry a Timestamp before its run's start: such a run lasted 0 s, as in
    # owners and daily.
    duration = case(
        (
            TaskRun.started_at.is_not(None),
            sql.greatest(sql.span(TaskRun.started_at, TaskRun.ended_at), sql.zero),
        ),
        else_=null(),
    )
    inner = select(
        TaskRun.stop_reason.label("stop_reason"),
        duration.label("d"),
    ).where(*conditions)
    ended = inner.subquery("ended")
    # The count comes first, from its own aggregate: COUNT(*) OVER () would hold every
    # row in memory until the last one is read.
    count, failed, unseen, timed, total_us = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((ended.c.stop_reason == FAILED, 1), else_=0)), 0),
            func.count() - func.count(ended.c.stop_reason),
            func.count(ended.c.d),
            sql.total_us(func.sum(ended.c.d)),
        )
    ).one()
    if not timed:
        return int(count), int(failed), int(unseen), _no_durations()
    ranks = _ranks(timed)
    ranked = (
        select(ended.c.d, func.row_number().over(order_by=ended.c.d).label("rn"))
        .where(ended.c.d.is_not(None))
        .subquery("ranked")
    )
    picked = select(ranked.c.rn, sql.total_us(ranked.c.d)).where(
        ranked.c.rn.in_(sorted(set(ranks.values())))
    )
    at_rank = {int(rn): int(us) for rn, us in session.execute(picked)}
    durations: Durations = {
        "mean": round(int(total_us) / timed / US, 3),
        "p50": round(at_rank[ranks[50]] / US, 3),
        "p95": round(at_rank[ranks[95]] / US, 3),
    }
    return int(count), int(failed), int(unseen), durations


def _ended_runs_pg(
    session: Session, sql: Dialect, conditions: list[ColumnElement[bool]]
) -> EndedRuns:
    span = TaskRun.ended_at - TaskRun.started_at  # NULL without a start
    count, failed, unseen, timed, total_us = session.execute(
        select(
            func.count(),
            func.count().filter(RUN_FAILED),
            func.count().filter(RUN_ENDED_UNSEEN),
            func.count(TaskRun.started_at),
            sql.total_us(func.sum(sql.greatest(span, sql.zero))),
        ).where(*conditions)
    ).one()
    if not timed:
        return int(count), int(failed), int(unseen), _no_durations()
    timed = int(timed)
    ranks = _ranks(timed)
    timed_runs = [*conditions, TaskRun.started_at.is_not(None)]
    p50_us, p95_us = (
        session.execute(_length_at_rank_pg(sql, timed_runs, timed, ranks[p])).scalar_one()
        for p in PERCENTILES
    )
    durations: Durations = {
        "mean": round(int(total_us) / timed / US, 3),
        # Clamped here rather than in the walk, which must follow the index's order.
        "p50": round(max(int(p50_us), 0) / US, 3),
        "p95": round(max(int(p95_us), 0) / US, 3),
    }
    return int(count), int(failed), int(unseen), durations


def _length_at_rank_pg(
    sql: Dialect, timed_runs: list[ColumnElement[bool]], timed: int, rank: int
) -> Query:
    """The run length at a rank, in microseconds.

    Read by walking the index on the length (ix_task_runs_span) from the nearer end, so
    p95 passes over 5 % of the runs, not all of them; for a narrow window the planner
    sorts the window instead.
    """
    span = TaskRun.ended_at - TaskRun.started_at
    walk = select(span.label("span")).where(*timed_runs)
    if rank - 1 <= timed - rank:
        walk = walk.order_by(span.asc()).offset(rank - 1).limit(1)
    else:
        walk = walk.order_by(span.desc()).offset(timed - rank).limit(1)
    # Converted outside the walk, so only the one row picked is converted.
    picked = walk.subquery("picked")
    return select(sql.total_us(picked.c.span))
