"""CSV cells that a spreadsheet opens as text.

Owner ids and task ids come from ZEGOCLOUD's callers. A cell that starts with = + - @,
a tab or a carriage return is a formula to Excel, LibreOffice and Google Sheets, so
such text is written with a leading apostrophe, which they show as text (OWASP's
advice for CSV injection). Numbers are written as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(row: Iterable[Any]) -> list[Any]:
    return [safe_cell(value) for value in row]
