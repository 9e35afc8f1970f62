"""`manager report NAME`: the reports of SPEC 3.4 as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext

from manager.cli.common import echo_table
from manager.cli.errors import failure
from manager.errors import DomainError, Invalid
from manager.reports.columns import COLUMNS, LIST_KEYS, REPORTS, ReportRow, flatten, row_cells
from manager.reports.csv_cells import safe_row
from manager.reports.daily import daily
from manager.reports.owners import (
    MAX_OWNERS_LIMIT,
    OWNERS_LIMIT,
    OwnersPage,
    owners,
    owners_page,
)
from manager.reports.params import check_days, parse_owners_limit, parse_silent_for, parse_window
from manager.reports.stuck import stuck
from manager.reports.summary import summary
from manager.stored_text import check_storable


@click.command("report")
@click.argument("name", type=click.Choice(REPORTS))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@click.option("--since", help="ISO 8601 or Unix seconds, UTC (inclusive)")
@click.option("--until", help="ISO 8601 or Unix seconds, UTC (exclusive)")
@click.option("--owner", help="only this owner's tasks")
@click.option(
    "--silent-for", default=None, help="stuck: seconds without a delivery  [default: 86400]"
)
@click.option(
    "--limit",
    default=None,
    help=f"owners: the first N (1-{MAX_OWNERS_LIMIT})  "
    f"[default: {OWNERS_LIMIT} as a table or JSON, all as CSV]",
)
@with_appcontext
def report_command(
    name: str,
    fmt: str,
    since: str | None,
    until: str | None,
    owner: str | None,
    silent_for: str | None,
    limit: str | None,
) -> None:
    """Print a report: summary, owners, daily or stuck."""

    try:
        window = parse_window(since, until)
        silent = parse_silent_for(silent_for)
        if name == "daily":
            check_days(window)
        if limit is not None and name != "owners":
            raise Invalid("invalid_parameter", "--limit applies to the owners report only")
        first, exported = parse_owners_limit(limit)
        if owner is not None:
            check_storable("--owner", owner)
    except DomainError as exc:
        raise failure(exc) from None

    with current_app.extensions["manager.sessions"]() as session:
        if name == "summary":
            _echo_summary(fmt, summary(session, window, owner))
        elif name == "owners" and fmt == "csv":
            _echo_rows(name, fmt, owners(session, window, owner, None, exported))  # an export
        elif name == "owners":
            _echo_owners_page(fmt, owners_page(session, window, owner, None, first), first)
        elif name == "daily":
            _echo_rows(name, fmt, daily(session, window, owner))
        else:
            _echo_rows(name, fmt, stuck(session, silent_for=silent, owner=owner))


def _echo_owners_page(fmt: str, page: OwnersPage, first: int) -> None:
    """A page of owners; as a table, a note on stderr when more follow."""
    _echo_rows("owners", fmt, page.owners, page.more)
    if page.more and fmt == "table":
        click.echo(
            f"(the first {first} owners; --limit up to {MAX_OWNERS_LIMIT}, "
            "or --format csv for all)",
            err=True,
        )


def _echo_summary(fmt: str, body: dict[str, Any]) -> None:
    if fmt == "json":
        click.echo(json.dumps(body, indent=2))
        return
    flat = flatten(body)
    if fmt == "csv":
        _echo_csv(list(flat), [list(flat.values())])
    else:
        echo_table(["field", "value"], [(k, _cell(v)) for k, v in flat.items()])


def _echo_rows(name: str, fmt: str, rows: Iterable[ReportRow], more: bool | None = None) -> None:
    """A list report's rows; as JSON, with `more` when the rows are a page of owners."""
    columns = COLUMNS[name]
    values = (row_cells(row) for row in rows)
    if fmt == "csv":
        _echo_csv(columns, values)
    elif fmt == "json":
        items = [dict(zip(columns, row, strict=True)) for row in values]
        listing: dict[str, Any] = {LIST_KEYS[name]: items}
        if more is not None:
            listing["more"] = more
        click.echo(json.dumps(listing, indent=2))
    else:
        echo_table(columns, ([_cell(v) for v in row] for row in values))


def _echo_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(safe_row(row) for row in rows)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)
