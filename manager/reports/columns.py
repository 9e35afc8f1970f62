"""The reports' rows as the edges show them: the list reports' columns, a row's values
in column order, and the summary as one flat row.

The HTTP API and the CLI both format these, as JSON, CSV or a table, and nothing else.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from operator import attrgetter
from typing import Any, TypeAlias

from manager.clock import iso
from manager.reports.daily import DayRow
from manager.reports.owners import OwnerRow
from manager.reports.stuck import StuckTask

REPORTS = ("summary", "owners", "daily", "stuck")

ReportRow: TypeAlias = OwnerRow | DayRow | StuckTask

COLUMNS: dict[str, tuple[str, ...]] = {
    "owners": tuple(f.name for f in fields(OwnerRow)),
    "daily": tuple(f.name for f in fields(DayRow)),
    "stuck": tuple(f.name for f in fields(StuckTask)),
}
# The key of a list report's rows in its JSON.
LIST_KEYS = {"owners": "owners", "daily": "days", "stuck": "tasks"}

# One getter per row type, built once: a million-row export calls it a million times.
_FIELD_GETTERS = {
    kind: attrgetter(*(f.name for f in fields(kind))) for kind in (OwnerRow, DayRow, StuckTask)
}


def row_values(row: ReportRow) -> tuple[Any, ...]:
    """A report row's fields in column order."""
    return _FIELD_GETTERS[type(row)](row)  # type: ignore[no-any-return]


def row_cells(row: ReportRow) -> list[Any]:
    """A report row's fields in column order, times as ISO 8601 UTC text (…Z)."""
    return [iso(v) if isinstance(v, datetime) else v for v in row_values(row)]


def flatten(report: dict[str, Any]) -> dict[str, Any]:
    """{"tasks": {"running": 1}} → {"tasks.running": 1}: the summary's CSV row."""
    flat: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{key}.{sub}"] = inner
        else:
            flat[key] = value
    return flat
