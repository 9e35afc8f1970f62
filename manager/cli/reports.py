"""`manager report NAME`: the reports of SPEC 3.4 as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext

from manager.cli.common import echo_table
from manager.cli.errors import failure
from manager.errors import DomainError, Invalid
from manager.reports.csv_cells import safe_row
from manager.reports.params import check_days, parse_silent_for, parse_window
from manager.reports.reporting import (
    COLUMNS,
    LIST_KEYS,
    MAX_OWNERS_LIMIT,
    OWNERS_LIMIT,
    REPORTS,
    daily,
    flatten,
    owners,
    owners_page,
    row_values,
    stuck,
    summary,
)
from manager.stored_text import check_storable
from manager.tasks.queries import iso, parse_limit


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
        first = parse_limit(limit, OWNERS_LIMIT, MAX_OWNERS_LIMIT)
        if owner is not None:
            check_storable("--owner", owner)
    except DomainError as exc:
        raise failure(exc) from None

    with current_app.extensions["manager.sessions"]() as session:
        if name == "summary":
            body = summary(session, window, owner)
            if fmt == "json":
                click.echo(json.dumps(body, indent=2))
                return
            flat = flatten(body)
            if fmt == "csv":
                _echo_csv(list(flat), [list(flat.values())])
            else:
                echo_table(["field", "value"], [(k, _cell(v)) for k, v in flat.items()])
            return
        more = False
        if name == "owners" and (fmt != "csv" or limit is not None):
            page = owners_page(session, window, owner, None, first)
            rows: Any = page.owners
            more = page.more
        elif name == "owners":
            rows = owners(session, window, owner)  # a CSV export: every owner
        elif name == "daily":
            rows = daily(session, window, owner)
        else:
            rows = stuck(session, silent_for=silent, owner=owner)
        columns = COLUMNS[name]
        values = ([_plain(v) for v in row_values(row)] for row in rows)
        if fmt == "csv":
            _echo_csv(columns, values)
        elif fmt == "json":
            items = [dict(zip(columns, row, strict=True)) for row in values]
            listing: dict[str, Any] = {LIST_KEYS[name]: items}
            if name == "owners":
                listing["more"] = more
            click.echo(json.dumps(listing, indent=2))
        else:
            echo_table(columns, ([_cell(v) for v in row] for row in values))
        if more and fmt == "table":
            click.echo(
                f"(the first {first} owners; --limit up to {MAX_OWNERS_LIMIT}, "
                "or --format csv for all)",
                err=True,
            )


def _echo_csv(columns: Any, rows: Any) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(safe_row(row) for row in rows)


def _plain(value: Any) -> Any:
    return iso(value) if hasattr(value, "isoformat") and not isinstance(value, str) else value


def _cell(value: Any) -> str:
    return "" if value is None else str(value)
