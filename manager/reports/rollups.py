"""Figures kept for the past that can no longer change: delivery_hours and run_days.

**delivery_hours**: deliveries per UTC hour and verdict.

Counting a long window's deliveries row by row grows with the history (3,000,000 rows
cost summary half a second). Most of any long window is whole hours that are over, and
an hour that is over stays the same: a delivery's received_at is read from the clock of
the process that took it as the request came in, and its row commits before the answer,
within the request timeout (seconds). Once an hour has been over for SEAL_DELAY, far
longer than any request and any clock skew between app instances, no delivery can
still arrive inside it, and nothing deletes deliveries: its counts are final.

The rows are written by whichever report first needs them, in a short transaction of
their own (two at once write the same rows; the second's are ignored), always as one
unbroken run of hours from the first delivery's, so the latest row tells how far the
run goes. When they cannot be written (a read-only database, a lock held too long),
the report counts the deliveries themselves instead.

**run_days**: `daily`'s figures per UTC day (runs started, stopped, failed, ended
unseen, busy microseconds). Every time the webhook writes into a run is a ZEGOCLOUD
Timestamp that passed the freshness check, so at most CALLBACK_MAX_AGE (7 days at most)
before the moment it is written (a run that ended unseen ends at the Timestamp of the
start that showed it); a run still going counts up to `now`, which a final day is
wholly before. So once a day has been over for RUN_DAYS_DELAY, no start, stop or
change of a run can touch it any more, and its figures are final. They are written
and read like delivery_hours, by `daily` (which supplies how to work them out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, TypeAlias

from sqlalchemy import Connection, Engine, func, select, union_all
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from manager.config import MAX_CALLBACK_MAX_AGE
from manager.db import write_connection
from manager.models import VERDICTS, Delivery, DeliveryHour, RunDay, TaskRun
from manager.sqlutil import insert_ignore_rows

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
SEAL_DELAY = timedelta(hours=1)
DAY = timedelta(days=1)
RUN_DAYS_DELAY = timedelta(seconds=MAX_CALLBACK_MAX_AGE, hours=1)

# (day, started, stopped, failed, ended unseen, busy microseconds)
DayFigures: TypeAlias = tuple[date, int, int, int, int, int]
# Works out the figures of the days [start, end) at `now`, in the session given.
DayFiguresOf: TypeAlias = Callable[[Session, date, date, datetime], list[DayFigures]]


@dataclass(frozen=True)
class HourCounts:
    """Deliveries by verdict received in the whole hours [start, end)."""

    start: datetime
    end: datetime
    counts: dict[str, int]


def floor_hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def ceil_hour(value: datetime) -> datetime:
    floor = floor_hour(value)
    return floor if floor == value else floor + HOUR


def final_until(now: datetime) -> datetime:
    """The end of the hours whose deliveries can no longer change."""
    return floor_hour(now - SEAL_DELAY)


def fill(engine: Engine, now: datetime) -> datetime | None:
    """Write the rows of the final hours not written yet; the end of the run, if any."""

    def rows(conn: Connection, start: datetime, until: datetime) -> list[dict[str, Any]]:
        counts = _count_by_hour(conn, start, until)
        zero = dict.fromkeys(VERDICTS, 0)
        return [{"hour": hour, **counts.get(hour, zero)} for hour in _steps(start, until, HOUR)]

    until = final_until(now)
    return _extend(engine, DeliveryHour.hour, HOUR, _first_received_hour, until, rows)


def hour_counts(
    engine: Engine, since: datetime | None, until: datetime | None, now: datetime
) -> HourCounts | None:
    """The counts of the final whole hours inside [since, until), or None if none.

    Writes the rows it needs first. The caller counts the deliveries outside
    [start, end) itself.
    """
    try:
        written_until = fill(engine, now)
    except DBAPIError:
        log.warning("could not write delivery_hours; counting deliveries one by one")
        return None
    if written_until is None:
        return None
    start = ceil_hour(since) if since is not None else None
    end = written_until if until is None else min(floor_hour(until), written_until)
    if start is not None and start >= end:
        return None
    conditions = [DeliveryHour.hour < end]
    if start is not None:
        conditions.append(DeliveryHour.hour >= start)
    columns = [getattr(DeliveryHour, verdict) for verdict in VERDICTS]
    with engine.connect() as conn:
        row = conn.execute(
            select(func.min(DeliveryHour.hour), *(func.sum(c) for c in columns)).where(*conditions)
        ).one()
    first, sums = row[0], row[1:]
    if first is None:
        return None
    counts = {verdict: int(n or 0) for verdict, n in zip(VERDICTS, sums, strict=True)}
    return HourCounts(start if start is not None else first, end, counts)


def final_days_until(now: datetime) -> date:
    """The first day whose runs may still change; the days before it are final."""
    return (now - RUN_DAYS_DELAY).date()


def fill_run_days(engine: Engine, now: datetime, figures_of: DayFiguresOf) -> date | None:
    """Write the rows of the final days not written yet; the end of the run, if any."""

    def rows(conn: Connection, start: date, until: date) -> list[dict[str, Any]]:
        with Session(bind=conn) as session:
            figures = figures_of(session, start, until, now)
        return [
            {
                "day": day,
                "started": started,
                "stopped": stopped,
                "failed": failed,
                "ended_unseen": unseen,
                "busy_us": busy_us,
            }
            for day, started, stopped, failed, unseen, busy_us in figures
        ]

    return _extend(engine, RunDay.day, DAY, _first_run_day, final_days_until(now), rows)


def _extend(
    engine: Engine,
    key: Any,
    step: timedelta,
    first_of: Callable[[Connection], Any],
    until: Any,
    rows_for: Callable[[Connection, Any, Any], list[dict[str, Any]]],
) -> Any:
    """Write the rows from the last one written (or the first of the data) up to until.

    In a write transaction of its own; returns the end of the unbroken run of rows,
    or None when there are none.
    """
    with write_connection(engine) as conn:
        last = conn.scalar(select(func.max(key)))
        start = last + step if last is not None else first_of(conn)
        if start is None:
            return None
        if start >= until:
            return start if last is not None else None
        insert_ignore_rows(conn, key.class_, rows_for(conn, start, until))
        return until


def _steps(start: Any, until: Any, step: timedelta) -> Iterator[Any]:
    while start < until:
        yield start
        start += step


def run_days(
    engine: Engine, start: date, end: date, now: datetime, figures_of: DayFiguresOf
) -> list[DayFigures] | None:
    """The figures of the final days [start, end), every day; None if they cannot be had.

    Writes the rows it needs first. Days before the first run's have none: all zero.
    """
    try:
        written_until = fill_run_days(engine, now, figures_of)
    except DBAPIError:
        log.warning("could not write run_days; working the days out from the runs")
        return None
    if written_until is None or end > written_until:
        return None
    figures = (RunDay.started, RunDay.stopped, RunDay.failed, RunDay.ended_unseen, RunDay.busy_us)
    with engine.connect() as conn:
        first = conn.scalar(select(func.min(RunDay.day)))
        rows = conn.execute(
            select(RunDay.day, *figures)
            .where(RunDay.day >= start, RunDay.day < end)
            .order_by(RunDay.day)
        ).all()
    stored = {row[0]: tuple(int(v) for v in row[1:]) for row in rows}
    out: list[DayFigures] = []
    for day in _steps(start, end, DAY):
        if day in stored:
            started, stopped, failed, unseen, busy = stored[day]
            out.append((day, started, stopped, failed, unseen, busy))
        elif first is None or day < first:
            out.append((day, 0, 0, 0, 0, 0))
        else:
            return None  # a gap: never written so; work it out instead
    return out


def _first_run_day(conn: Connection) -> date | None:
    # Two index lookups: the earliest start and the earliest end.
    firsts = [
        conn.scalar(select(func.min(TaskRun.started_at))),
        conn.scalar(select(func.min(TaskRun.ended_at))),
    ]
    known = [_as_datetime(t) for t in firsts if t is not None]
    return min(known).date() if known else None


def _first_received_hour(conn: Connection) -> datetime | None:
    # One index lookup per verdict: the index on deliveries leads with the verdict.
    firsts = union_all(
        *(
            select(func.min(Delivery.received_at).label("first")).where(Delivery.verdict == verdict)
            for verdict in VERDICTS
        )
    ).subquery("firsts")
    first = conn.scalar(select(func.min(firsts.c.first)))
    return floor_hour(_as_datetime(first)) if first is not None else None


def _count_by_hour(
    conn: Connection, start: datetime, until: datetime
) -> dict[datetime, dict[str, int]]:
    if conn.dialect.name == "postgresql":
        hour: Any = func.date_trunc("hour", Delivery.received_at)
    else:
        # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' text.
        hour = func.strftime("%Y-%m-%d %H:00:00", Delivery.received_at)
    counts: dict[datetime, dict[str, int]] = {}
    for verdict in VERDICTS:
        query = (
            select(hour, func.count())
            .where(
                Delivery.verdict == verdict,
                Delivery.received_at >= start,
                Delivery.received_at < until,
            )
            .group_by(hour)
        )
        for at, n in conn.execute(query):
            counts.setdefault(_as_datetime(at), dict.fromkeys(VERDICTS, 0))[verdict] = int(n)
    return counts


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)
