"""The reports' public names in one namespace, for callers that say `reporting.daily`.

Only names: each report lives in a module of its own (summary, owners, daily, stuck),
what they share in window, dialect, queries and columns.
"""

from __future__ import annotations

from manager.reports.columns import COLUMNS, LIST_KEYS, REPORTS, flatten, row_cells, row_values
from manager.reports.daily import DayRow, daily, day_figures, final_day_figures
from manager.reports.owners import (
    MAX_OWNERS_LIMIT,
    OWNERS_LIMIT,
    OwnerKey,
    OwnerRow,
    OwnersPage,
    owners,
    owners_page,
)
from manager.reports.stuck import DEFAULT_SILENT_FOR, STOPPING_GRACE, StuckTask, stuck
from manager.reports.summary import summary
from manager.reports.window import DEFAULT_DAYS, MAX_DAYS, Window, daily_window, day_count

__all__ = [
    "COLUMNS",
    "DEFAULT_DAYS",
    "DEFAULT_SILENT_FOR",
    "LIST_KEYS",
    "MAX_DAYS",
    "MAX_OWNERS_LIMIT",
    "OWNERS_LIMIT",
    "REPORTS",
    "STOPPING_GRACE",
    "DayRow",
    "OwnerKey",
    "OwnerRow",
    "OwnersPage",
    "StuckTask",
    "Window",
    "daily",
    "daily_window",
    "day_count",
    "day_figures",
    "final_day_figures",
    "flatten",
    "owners",
    "owners_page",
    "row_cells",
    "row_values",
    "stuck",
    "summary",
]
