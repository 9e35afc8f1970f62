"""The daily report (SPEC 3.4): per UTC day of the window, runs started, stopped,
failed, ended unseen, and transcoding seconds.

The whole days that can no longer change come from run_days (manager/reports/rollups.py);
the rest is worked out from the runs by `day_figures`, one query on SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Engine,
    Integer,
    case,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import TaskRun
from manager.reports import rollups
from manager.reports.dialect import DAY_US, Dialect, Query, seconds, ts
from manager.reports.queries import RUN_ENDED_UNSEEN, RUN_FAILED, RUN_STOPPED
from manager.reports.window import Window, ceil_day, daily_window, day_count, midnight


@dataclass(frozen=True)
class DayRow:
    """One UTC day's line of the daily report."""

    day: str
    started: int
    stopped: int
    failed: int
    ended_unseen: int
    transcoding_seconds: int


def daily(
    session: Session,
    window: Window | None = None,
    owner: str | None = None,
    now: datetime | None = None,
) -> list[DayRow]:
    """Per UTC day of the window: runs started, stopped, failed, ended unseen, and
    transcoding seconds; the runs ended on a day are stopped + failed + ended unseen.

    The whole days of the window that can no longer change come from run_days (see
    manager/reports/rollups.py), the rest is worked out from the runs by `day_figures`.
    """
    now = now or utcnow()
    window = daily_window(window or Window(), now)
    figures = None if owner is not None else _figures_with_run_days(session, window, now)
    if figures is None:
        figures = day_figures(session, window, owner, now)
    return [
        DayRow(day.isoformat(), started, stopped, failed, unseen, seconds(busy_us))
        for day, started, stopped, failed, unseen, busy_us in figures
    ]


def _figures_with_run_days(
    session: Session, window: Window, now: datetime
) -> list[rollups.DayFigures] | None:
    """Every owner's figures, the final whole days read from run_days; None if it can't."""
    assert window.since is not None  # noqa: S101
    assert window.until is not None  # noqa: S101
    bind = session.get_bind()
    first_whole = ceil_day(window.since)
    end_whole = min(window.until.date(), rollups.final_days_until(now))
    if not (isinstance(bind, Engine) and first_whole < end_whole):
        return None
    stored = rollups.run_days(bind, first_whole, end_whole, now, final_day_figures)
    if stored is None:
        return None
    head = day_figures(session, Window(window.since, midnight(first_whole)), None, now)
    tail = day_figures(session, Window(midnight(end_whole), window.until), None, now)
    return head + stored + tail


def final_day_figures(
    session: Session, start: date, end: date, now: datetime
) -> list[rollups.DayFigures]:
    """The figures of the whole days [start, end), for run_days."""
    return day_figures(session, Window(midnight(start), midnight(end)), None, now)


def day_figures(
    session: Session, window: Window, owner: str | None, now: datetime
) -> list[rollups.DayFigures]:
    """Per UTC day of [since, until): runs started, stopped, failed, ended unseen, busy us.

    The seconds come from a sweep over the day boundaries, not from a join of every run
    with every day it touches: the runs overlapping the window, clipped to it (a running
    one to `now`), are grouped by (start day, end day). Each group adds to its start day
    the time from the starts to the next midnight, to its end day the time from that
    midnight to the ends (a run within one day: its whole length), and one full day per
    run to every day in between, counted +n on the day after the start day and -n on the
    end day and summed up over the days in order. Runs started, and runs ended by how
    they ended, are counted day by day, each a range of the index on started_at or
    ended_at.
    """
    assert window.since is not None  # noqa: S101
    assert window.until is not None  # noqa: S101
    n_days = day_count(window.since, window.until)
    if n_days == 0:
        return []
    first = window.since.date()
    sql = Dialect(session)
    # One literal for both uses, so the statement binds it once.
    day_us = literal(DAY_US, BigInteger)
    spans = _spans(sql, window, owner, now, first)
    query = _per_day(sql, window, owner, first, n_days, _events(spans, day_us), day_us)
    return [
        (
            first + timedelta(days=int(day)),
            int(n_started),
            int(n_stopped),
            int(n_failed),
            int(n_unseen),
            int(busy_us or 0),
        )
        for day, n_started, n_stopped, n_failed, n_unseen, busy_us in session.execute(query)
    ]


def _owned(query: Query, owner: str | None) -> Query:
    return query if owner is None else query.where(TaskRun.owner == owner)


def _clipped(
    sql: Dialect,
    window: Window,
    owner: str | None,
    first: date,
    end: Any,
    *conditions: ColumnElement[bool],
) -> Query:
    """Runs clipped to the window: start and end day, and the times since their midnights."""
    assert window.since is not None  # noqa: S101
    assert window.until is not None  # noqa: S101
    lo = sql.greatest(TaskRun.started_at, ts(window.since))
    hi = sql.least(end, ts(window.until))
    start_day, start_offset = sql.day_and_offset(lo, first)
    end_day, end_offset = sql.day_and_offset(hi, first)
    return _owned(
        select(
            start_day.label("a"),
            end_day.label("b"),
            start_offset.label("lo"),
            end_offset.label("hi"),
            # started_at < until follows from hi > lo; it lets the planner read a
            # window near the start of the history by the started_at index.
        ).where(
            TaskRun.started_at.is_not(None),
            TaskRun.started_at < ts(window.until),
            hi > lo,
            *conditions,
        ),
        owner,
    )


def _spans(sql: Dialect, window: Window, owner: str | None, now: datetime, first: date) -> Any:
    """The clipped runs grouped by (start day a, end day b): n, and their offsets summed."""
    assert window.since is not None  # noqa: S101
    # The runs overlapping the window, clipped to it: those ended in or after it (a
    # range of the ended_at index) and, unless `now` is before it, those still going.
    branches = [
        _clipped(sql, window, owner, first, TaskRun.ended_at, TaskRun.ended_at >= ts(window.since))
    ]
    if now >= window.since:
        branches.append(_clipped(sql, window, owner, first, ts(now), TaskRun.ended_at.is_(None)))
    runs = union_all(*branches).subquery("runs")
    return (
        select(
            runs.c.a,
            runs.c.b,
            func.count().label("n"),
            sql.total_us(func.sum(runs.c.lo)).label("lo_us"),
            sql.total_us(func.sum(runs.c.hi)).label("hi_us"),
        )
        .group_by(runs.c.a, runs.c.b)
        .cte("spans")
    )


def _event(k: Any, busy: Any = 0, full: Any = 0) -> Query:
    """A row of additions to day k: busy microseconds, runs under way all day from k."""
    return select(
        k.label("k"),
        (literal(busy, BigInteger) if isinstance(busy, int) else busy).label("busy"),
        (literal(full, BigInteger) if isinstance(full, int) else full).label("full"),
    )


def _events(spans: Any, day_us: Any) -> Any:
    """What each group of spans adds to its days: the sweep's events (subquery `events`)."""
    head = case(
        (spans.c.a == spans.c.b, spans.c.hi_us - spans.c.lo_us),
        else_=spans.c.n * day_us - spans.c.lo_us,
    )
    crosses = spans.c.a < spans.c.b
    return union_all(
        _event(spans.c.a, busy=head),
        _event(spans.c.b, busy=spans.c.hi_us).where(crosses),
        _event(spans.c.a + 1, full=spans.c.n).where(crosses),
        _event(spans.c.b, full=-spans.c.n).where(crosses),
    ).subquery("events")


def _per_day(
    sql: Dialect,
    window: Window,
    owner: str | None,
    first: date,
    n_days: int,
    events: Any,
    day_us: Any,
) -> Query:
    """Day k = 0 … n_days - 1: runs started, stopped, failed, ended unseen; busy us."""
    k = literal(0, Integer).label("k")
    seed = select(k).cte("days", recursive=True)
    days = seed.union_all(select((seed.c.k + 1).label("k")).where(seed.c.k + 1 < n_days))
    # Runs under way all day long on day k: those that entered on a day up to k, less
    # those that left.
    full_days = func.sum(func.coalesce(func.sum(events.c.full), 0)).over(order_by=days.c.k)
    day_start, day_end = sql.day_bounds(days.c.k, first)

    def on_the_day(column: Any, *conditions: ColumnElement[bool]) -> Any:
        """Runs whose `column` falls on the day: a range of the index on it, counted."""
        return _owned(
            select(func.count()).where(
                window.contains(column), column >= day_start, column < day_end, *conditions
            ),
            owner,
        ).scalar_subquery()

    return (
        select(
            days.c.k,
            on_the_day(TaskRun.started_at),
            on_the_day(TaskRun.ended_at, RUN_STOPPED),
            on_the_day(TaskRun.ended_at, RUN_FAILED),
            on_the_day(TaskRun.ended_at, RUN_ENDED_UNSEEN),
            func.coalesce(func.sum(events.c.busy), 0) + full_days * day_us,
        )
        .select_from(days)
        .outerjoin(events, events.c.k == days.c.k)
        .group_by(days.c.k)
        .order_by(days.c.k)
    )
