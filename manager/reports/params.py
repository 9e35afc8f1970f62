"""The reports' parameters: a window, a page of owners (its size and cursor), a silence;
the web and CLI edges parse with these, so both refuse the same input the same way."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from manager.clock import utcnow
from manager.errors import Invalid
from manager.params import is_number, parse_limit, parse_range
from manager.reports.owners import MAX_OWNERS_LIMIT, OWNERS_LIMIT, OwnerKey
from manager.reports.stuck import DEFAULT_SILENT_FOR
from manager.reports.window import MAX_DAYS, Window, daily_window, day_count


def parse_window(since_raw: str | None, until_raw: str | None) -> Window:
    """since/until as a Window; a bad value is a 400 naming the parameter."""
    since, until = parse_range(since_raw, until_raw)
    return Window(since, until)


def parse_owners_limit(raw: str | None) -> tuple[int, int | None]:
    """How many owners a listing reads: a page (`limit`, OWNERS_LIMIT by default), and an
    export (`limit`, every owner by default: None)."""
    page = parse_limit(raw, OWNERS_LIMIT, MAX_OWNERS_LIMIT)
    return page, None if raw is None or raw == "" else page


def encode_owners_cursor(key: OwnerKey, now: datetime) -> str:
    """Where the next page of owners starts, and the time the listing is worked out at."""
    raw = json.dumps([key.busy_us, key.owner, now.isoformat()], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_owners_cursor(raw: str | None) -> tuple[OwnerKey | None, datetime]:
    """The key and time of a cursor from encode_owners_cursor; none: from the top, now."""
    if raw is None or raw == "":
        return None, utcnow()
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        busy_us, owner, at = json.loads(text)
        now = datetime.fromisoformat(at)
        valid_key = type(busy_us) is int and 0 <= busy_us < 2**63 and isinstance(owner, str | None)
        if not valid_key or now.tzinfo is not None:
            raise ValueError(raw)
        return OwnerKey(busy_us, owner), now
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise Invalid("invalid_parameter", "cursor is not one this API issued") from None


def check_days(window: Window) -> None:
    """Refuse a daily report of more days than MAX_DAYS."""
    full = daily_window(window)
    assert full.since is not None  # noqa: S101
    assert full.until is not None  # noqa: S101
    if day_count(full.since, full.until) > MAX_DAYS:
        raise Invalid("invalid_parameter", f"since/until span more than {MAX_DAYS} days")


def parse_silent_for(raw: str | None) -> int:
    """stuck's silence in seconds, DEFAULT_SILENT_FOR by default."""
    if raw is None or raw == "":
        return DEFAULT_SILENT_FOR
    if not is_number(raw) or len(raw) > 10:
        raise Invalid("invalid_parameter", "silent_for must be a number of seconds")
    return int(raw)
