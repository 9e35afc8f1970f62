"""Deliveries per UTC hour and verdict, kept for the hours that can no longer change.

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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select, union_all
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

from .db import WRITE_OPTION
from .models import VERDICTS, Delivery, DeliveryHour

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
SEAL_DELAY = timedelta(hours=1)
_INSERT_BATCH = 1000


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
    until = final_until(now)
    options = {WRITE_OPTION: True}
    with engine.connect().execution_options(**options) as conn, conn.begin():
        last = conn.scalar(select(func.max(DeliveryHour.hour)))
        if last is not None:
            start = last + HOUR
        else:
            first = _first_received(conn)
            if first is None:
                return None
            start = floor_hour(first)
        if start >= until:
            return start if last is not None else None
        counts = _count_by_hour(conn, start, until)
        rows: list[dict[str, Any]] = []
        hour = start
        while hour < until:
            rows.append({"hour": hour, **counts.get(hour, dict.fromkeys(VERDICTS, 0))})
            hour += HOUR
        insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        for at in range(0, len(rows), _INSERT_BATCH):
            batch = rows[at : at + _INSERT_BATCH]
            conn.execute(insert(DeliveryHour).on_conflict_do_nothing(), batch)
        return until


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


def _first_received(conn: Connection) -> datetime | None:
    # One index lookup per verdict: the index on deliveries leads with the verdict.
    firsts = union_all(
        *(
            select(func.min(Delivery.received_at).label("first")).where(Delivery.verdict == verdict)
            for verdict in VERDICTS
        )
    ).subquery("firsts")
    first = conn.scalar(select(func.min(firsts.c.first)))
    return _as_datetime(first) if first is not None else None


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
