"""What the reports share about time: the window [since, until) and UTC days.

Times are naive UTC. A window is [since, until), each end optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_

from manager.clock import utcnow
from manager.reports.dialect import ts

DEFAULT_DAYS = 30
MAX_DAYS = 3660


@dataclass(frozen=True)
class Window:
    """[since, until); None leaves that end open."""

    since: datetime | None = None
    until: datetime | None = None

    def contains(self, column: Any) -> ColumnElement[bool]:
        """The column is set and inside the window."""
        conditions = [column.is_not(None)]
        if self.since is not None:
            conditions.append(column >= ts(self.since))
        if self.until is not None:
            conditions.append(column < ts(self.until))
        return and_(*conditions)


def daily_window(window: Window, now: datetime | None = None) -> Window:
    """The window `daily` reports on: until defaults to now, since to 30 UTC days before."""
    until = window.until or now or utcnow()
    since = window.since
    if since is None:
        # The last DEFAULT_DAYS days that [since, until) touches, the day of until included
        # unless until is its first instant.
        since = midnight(ceil_day(until)) - timedelta(days=DEFAULT_DAYS)
    return Window(since, until)


def day_count(since: datetime, until: datetime) -> int:
    """How many UTC days [since, until) touches."""
    if until <= since:
        return 0
    last = until - timedelta(microseconds=1)
    return (last.date() - since.date()).days + 1


def midnight(day: date) -> datetime:
    """The first instant of the day."""
    return datetime.combine(day, time())


def ceil_day(value: datetime) -> date:
    """The day that starts at or after the value."""
    return value.date() if value == midnight(value.date()) else value.date() + timedelta(days=1)
