"""The service's one clock: naive UTC, as every DateTime column stores it, and how its
times are written out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    """A stored (naive UTC) time as the API, the CSV and the events write it."""
    return None if value is None else value.isoformat() + "Z"


def whole_seconds(start: datetime, end: datetime) -> int:
    """Whole seconds from start to end, rounded half up as the reports round them, never
    negative."""
    return max((end - start + timedelta(microseconds=500_000)) // timedelta(seconds=1), 0)
