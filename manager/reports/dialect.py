"""The few SQL expressions PostgreSQL and SQLite spell differently, for the reports.

Durations are computed exactly, in microseconds (PostgreSQL sums intervals, SQLite
integer microseconds), and rounded in Python, so both databases give the same numbers.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Interval,
    Select,
    String,
    cast,
    extract,
    func,
    literal,
    text,
    type_coerce,
)
from sqlalchemy.orm import Session

# Any select, whatever its columns.
Query: TypeAlias = Select[*tuple[Any, ...]]

US = 1_000_000
DAY_US = 86400 * US


def ts(value: datetime) -> Any:
    """A timestamp literal, comparable with the stored columns."""
    return literal(value, DateTime)


def seconds(total_us: Any) -> int:
    """Microseconds → whole seconds, rounded half up."""
    return (int(total_us or 0) + US // 2) // US


class Dialect:
    """The few expressions PostgreSQL and SQLite spell differently.

    Spans of time are intervals on PostgreSQL and integer microseconds on SQLite;
    `total_us` turns either into integer microseconds, once per aggregate.
    """

    def __init__(self, session: Session) -> None:
        self.pg = session.get_bind().dialect.name == "postgresql"
        if self.pg:
            # For this transaction only: sorts and hashes of a million rows fit in
            # memory, JIT compilation costs more than it saves on these queries, and
            # the indexes they read are cached, so index-only range scans are cheap
            # (at the default cost of 4 the planner picks sequential scans instead).
            session.execute(text("SET LOCAL work_mem = '64MB'"))
            session.execute(text("SET LOCAL jit = off"))
            session.execute(text("SET LOCAL random_page_cost = 1.1"))
        self.zero: Any = literal(timedelta(0)) if self.pg else literal(0, BigInteger)

    def span_of_us(self, us: int) -> Any:
        """A span of `us` microseconds, comparable with the sums of spans."""
        if self.pg:
            return literal(timedelta(microseconds=us), Interval)
        return literal(us, BigInteger)

    def greatest(self, *terms: Any) -> Any:
        """The largest of the terms (GREATEST, or SQLite's many-argument MAX)."""
        if len(terms) == 1:
            return terms[0]
        return func.greatest(*terms) if self.pg else func.max(*terms)

    def least(self, *terms: Any) -> Any:
        """The smallest of the terms (LEAST, or SQLite's many-argument MIN)."""
        if len(terms) == 1:
            return terms[0]
        return func.least(*terms) if self.pg else func.min(*terms)

    def span(self, lo: Any, hi: Any) -> Any:
        """The time from lo to hi: an interval, or integer microseconds."""
        if self.pg:
            return hi - lo
        return self._us(hi) - self._us(lo)

    def total_us(self, span: Any) -> Any:
        """A span (or a sum of spans) as integer microseconds."""
        if self.pg:
            return cast(func.round(extract("epoch", span) * US), BigInteger)
        return span

    def day_index(self, column: Any, first: date) -> Any:
        """Whole UTC days from `first` to the column's day."""
        if self.pg:
            return cast(column, Date) - literal(first, Date)
        start = literal(first.isoformat() + " 00:00:00.000000", String)
        return (self._us(column) - self._us(start)) // DAY_US

    def day_and_offset(self, value: Any, first: date) -> tuple[Any, Any]:
        """Whole UTC days from `first` to the value's day, and the time since its midnight.

        The time is an interval on PostgreSQL and integer microseconds on SQLite.
        """
        if self.pg:
            return self.day_index(value, first), value - func.date_trunc("day", value)
        since_first = self._us(value) - self._us(
            literal(first.isoformat() + " 00:00:00.000000", String)
        )
        return since_first // DAY_US, since_first % DAY_US

    def day_bounds(self, k: Any, first: date) -> tuple[Any, Any]:
        """Start and end of day `first + k`, comparable with the stored timestamps."""
        if self.pg:
            start = literal(datetime.combine(first, time()), DateTime) + k * literal(
                timedelta(days=1)
            )
            return start, start + literal(timedelta(days=1))
        # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' text.
        base = literal(first.isoformat(), String)

        def at(offset: Any) -> Any:
            day = func.date(base, literal("+", String).concat(cast(offset, String)).concat(" days"))
            return type_coerce(day.concat(" 00:00:00.000000"), DateTime)

        return at(k), at(k + 1)

    @staticmethod
    def _us(value: Any) -> Any:
        text_value = type_coerce(value, String)
        whole = cast(func.strftime("%s", text_value), BigInteger)
        micros = cast(func.substr(text_value.concat(".000000"), 21, 6), BigInteger)
        return whole * US + micros
