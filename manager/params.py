"""How the API and the CLI read numbers, times, ranges, statuses and page sizes: one rule
each, refusing bad input with Invalid naming the parameter."""

from __future__ import annotations

from datetime import UTC, datetime

from manager.errors import Invalid
from manager.models import (
    TASK_STATUSES,
)

MAX_PAGE = 500


# The times the API accepts: room on either side for the reports' day arithmetic, and
# nothing ZEGOCLOUD could have sent is outside.
EARLIEST = datetime(1970, 1, 1)
LATEST = datetime(9000, 1, 1)


def is_number(raw: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses."""
    return raw.isascii() and raw.isdigit()


def parse_time(name: str, raw: str | None) -> datetime | None:
    """ISO 8601 or Unix seconds, as naive UTC; a bad value is a 400 naming the parameter."""
    if raw is None or raw == "":
        return None
    try:
        if is_number(raw):
            parsed = datetime.fromtimestamp(int(raw), UTC)
        else:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError, OSError):
        raise Invalid("invalid_parameter", f"{name} must be ISO 8601 or Unix seconds") from None
    if not EARLIEST <= parsed <= LATEST:
        raise Invalid(
            "invalid_parameter",
            f"{name} must be from {EARLIEST.date().isoformat()} to {LATEST.date().isoformat()}",
        )
    return parsed


def parse_range(
    since_raw: str | None, until_raw: str | None
) -> tuple[datetime | None, datetime | None]:
    """since and until, each checked by parse_time, until later than since."""
    since = parse_time("since", since_raw)
    until = parse_time("until", until_raw)
    if since is not None and until is not None and until <= since:
        raise Invalid("invalid_parameter", "until must be later than since")
    return since, until


def parse_status(raw: str | None) -> str | None:
    if raw in (None, ""):
        return None
    if raw not in TASK_STATUSES:
        raise Invalid("invalid_parameter", f"status must be one of {', '.join(TASK_STATUSES)}")
    return raw


def parse_limit(raw: str | None, default: int = 50, maximum: int = MAX_PAGE) -> int:
    """A page size from 1 to `maximum`; a bad value is a 400 naming `limit`."""
    if raw in (None, ""):
        return default
    assert raw is not None  # noqa: S101
    # Length first: int() refuses more than 4,300 digits with a ValueError.
    if not is_number(raw) or len(raw) > 20 or not 1 <= int(raw) <= maximum:
        raise Invalid("invalid_parameter", f"limit must be an integer from 1 to {maximum}")
    return int(raw)
