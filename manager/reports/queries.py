"""What the reports' queries share: which runs a window covers, how runs ended, how
rows are counted and streamed.

Every function takes a Session (or builds a query), never commits and never imports
Flask. A run's time counts from its start to its end, or to `now` while it is still
going; a run whose start never arrived counts no time.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    case,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from manager.callbacks.rules import FAILED_ON_ITS_OWN
from manager.models import TaskRun
from manager.reports.dialect import Dialect, Query, ts
from manager.reports.window import Window

STREAM_BATCH = 2000

FAILED = FAILED_ON_ITS_OWN  # task_runs.stop_reason of a run ZEGOCLOUD ended on its own

# How an ended run ended, read off its stop_reason as the task's status is: StopReason 1
# failed, any other stopped; none at all, it ended unseen (a later start showed that it
# had ended, its stop callback never came). Every ended run is exactly one of the three.
RUN_FAILED = TaskRun.stop_reason == FAILED
RUN_STOPPED = TaskRun.stop_reason != FAILED  # NULL compares to neither
RUN_ENDED_UNSEEN = TaskRun.stop_reason.is_(None)


def runs_in(query: Query, window: Window, now: datetime, owner: str | None) -> Query:
    """Runs that overlap the window; a run ended in the window counts even without a start."""
    conditions: list[ColumnElement[bool]] = []
    if window.until is not None:
        # Its start (or without one, its end) before `until`; spelled out rather than
        # COALESCE(started_at, ended_at), of which PostgreSQL has no statistics: it
        # guessed a third of the runs, and for a window of weeks chose to hash a million
        # owners (spilling to disk) rather than read them in order from the index.
        until = ts(window.until)
        conditions.append(
            or_(
                TaskRun.started_at < until,
                and_(TaskRun.started_at.is_(None), TaskRun.ended_at < until),
            )
        )
    if window.since is not None:
        ongoing: ColumnElement[bool] = TaskRun.ended_at.is_(None)
        if now < window.since:
            ongoing = literal(False)
        conditions.append(or_(TaskRun.ended_at >= ts(window.since), ongoing))
    if owner is not None:
        conditions.append(TaskRun.owner == owner)
    return query.where(*conditions) if conditions else query


def overlap(sql: Dialect, window: Window, now: datetime) -> Any:
    """The part of a run inside the window: an interval, or 0/NULL when none."""
    lo_terms: list[Any] = [TaskRun.started_at]
    hi_terms: list[Any] = [func.coalesce(TaskRun.ended_at, ts(now))]
    if window.since is not None:
        lo_terms.append(ts(window.since))
    if window.until is not None:
        hi_terms.append(ts(window.until))
    lo = sql.greatest(*lo_terms)
    hi = sql.least(*hi_terms)
    return case(
        (and_(TaskRun.started_at.is_not(None), hi > lo), sql.span(lo, hi)),
        else_=null(),
    )


def stream(session: Session, query: Query) -> Iterator[Any]:
    """Rows from a server-side cursor, fetched in batches, so memory stays flat.

    Through the session's connection (Core): these rows are tuples, and the ORM's
    per-row handling costs as much again as the rest of the Python side.
    """
    connection = session.connection()
    result = connection.execute(query.execution_options(yield_per=STREAM_BATCH))
    try:
        yield from result
    finally:
        result.close()


def counts(session: Session, query: Query) -> dict[str, int]:
    """A query's (key, count) rows as a dict."""
    return {key: int(n) for key, n in session.execute(query).all()}


def counts_each(
    session: Session,
    column: Any,
    values: tuple[str, ...],
    *alternatives: list[ColumnElement[bool]],
) -> dict[str, int]:
    """Rows per value of `column` matching any of the disjoint `alternatives`.

    One COUNT per value and alternative, UNION ALL: each an index range when an index
    leads with `column`.
    """
    query = union_all(
        *(
            select(literal(value, String), func.count()).where(column == value, *conditions)
            for value in values
            for conditions in alternatives
        )
    )
    found = dict.fromkeys(values, 0)
    for key, n in session.execute(query):
        found[key] += int(n)
    return found
