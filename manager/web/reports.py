"""Reports: GET /api/reports/<name> as JSON, or CSV streamed row by row (bearer token)."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from flask import Blueprint, Response, current_app, request
from sqlalchemy.orm import Session

from manager.errors import Invalid, NotFound
from manager.reports.columns import COLUMNS, LIST_KEYS, REPORTS, flatten, row_cells
from manager.reports.csv_cells import safe_row
from manager.reports.daily import daily
from manager.reports.owners import MAX_OWNERS_LIMIT, OWNERS_LIMIT, owners, owners_page
from manager.reports.params import (
    check_days,
    decode_owners_cursor,
    encode_owners_cursor,
    parse_owners_limit,
    parse_silent_for,
    parse_window,
)
from manager.reports.stuck import DEFAULT_SILENT_FOR, stuck
from manager.reports.summary import summary
from manager.reports.window import Window
from manager.services import get_session
from manager.stored_text import check_storable
from manager.web.auth import require_token
from manager.web.openapi import (
    OWNER,
    SINCE,
    UNTIL,
    documented,
    integer_query,
    or_empty,
    query,
)

bp = Blueprint("reports", __name__, url_prefix="/api/reports")

FORMATS = ("json", "csv")
REPORT_NAME = {"type": "string", "enum": list(REPORTS)}
MAX_SILENT_FOR = 10**10 - 1  # parse_silent_for takes up to ten digits


@bp.get("/<name>")
@documented(
    "A report, as JSON or CSV",
    description=(
        "summary, owners, daily or stuck over the window [since, until), computed in SQL. "
        "CSV (format=csv, or Accept: text/csv) has a header row, then one row per item; "
        "the summary is one row of group.field columns."
    ),
    path_parameters={"name": {"description": "the report", "schema": REPORT_NAME}},
    parameters=[
        SINCE,
        UNTIL,
        OWNER,
        query("format", or_empty({"enum": list(FORMATS)}), "else from Accept; else json"),
        integer_query(
            "limit",
            1,
            MAX_OWNERS_LIMIT,
            f"owners: a page of this many ({OWNERS_LIMIT} unless given); CSV: at most this many",
        ),
        query("cursor", {"type": "string"}, "owners: the next_cursor of the page before"),
        integer_query(
            "silent_for",
            0,
            MAX_SILENT_FOR,
            f"stuck: seconds without a delivery ({DEFAULT_SILENT_FOR} unless given)",
        ),
    ],
    responses={
        200: {
            "description": "The report.",
            "content": {
                "application/json": {"schema": "Report"},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        400: "Invalid",
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def report(name: str) -> Response:
    """A report as JSON or CSV: the rows of the functions the CLI calls, formatted."""
    if name not in REPORTS:
        raise NotFound("unknown_report", f"no report {name!r}; try {', '.join(REPORTS)}")
    args = request.args
    fmt = _format()
    window = parse_window(args.get("since"), args.get("until"))
    owner = args.get("owner") or None
    if owner is not None:
        check_storable("owner", owner)
    if name == "summary":
        body = summary(get_session(), window, owner)
        if fmt == "json":
            return _json_response(body)
        flat = flatten(body)
        return _csv_response(name, list(flat), [list(flat.values())])
    if name == "daily":
        check_days(window)
        days = daily(get_session(), window, owner)
        return _list_response(name, fmt, (row_cells(day) for day in days))

    if name == "owners":
        return _owners_report(fmt, window, owner)
    silent_for = parse_silent_for(args.get("silent_for"))
    return _streamed(name, fmt, lambda session: stuck(session, silent_for=silent_for, owner=owner))


def _owners_report(fmt: str, window: Window, owner: str | None) -> Response:
    """JSON: a page of owners, the first 100 unless `limit` says otherwise, with a cursor
    to the next; CSV: every owner, streamed, unless `limit` is given."""
    args = request.args
    # A listing is worked out as of the time of its first page, carried in the cursor,
    # so that running tasks' growing time does not move owners from page to page.
    after, now = decode_owners_cursor(args.get("cursor"))
    limit, exported = parse_owners_limit(args.get("limit"))
    if fmt == "json":
        page = owners_page(get_session(), window, owner, now, limit, after)
        columns = COLUMNS["owners"]
        items = [dict(zip(columns, row_cells(row), strict=True)) for row in page.owners]
        cursor = None if page.next_key is None else encode_owners_cursor(page.next_key, now)
        return _json_response({"owners": items, "more": page.more, "next_cursor": cursor})
    return _streamed(
        "owners", fmt, lambda session: owners(session, window, owner, now, exported, after)
    )


def _streamed(name: str, fmt: str, rows_of: Callable[[Session], Iterable[Any]]) -> Response:
    """A list report read from a session of its own, row by row as the body is sent."""
    # Flask tears down the app context, and the request's session with it, before a
    # streamed body is read: the response closes this session when it is done (or the
    # client goes away).
    session = current_app.extensions["manager.sessions"]()
    try:
        # Run the query now, so that a database error is still a proper error response.
        values = _primed(row_cells(row) for row in rows_of(session))
        response = _list_response(name, fmt, _closing(values, session))
    except BaseException:
        session.close()
        raise
    response.call_on_close(session.close)
    return response


def _list_response(name: str, fmt: str, values: Iterator[list[Any]]) -> Response:
    if fmt == "csv":
        return _csv_response(name, COLUMNS[name], values)
    return _json_list_response(LIST_KEYS[name], COLUMNS[name], values)


def _format() -> str:
    raw = request.args.get("format")
    if raw is None or raw == "":
        best = request.accept_mimetypes.best_match(["application/json", "text/csv"])
        return "csv" if best == "text/csv" else "json"
    if raw not in FORMATS:
        raise Invalid("invalid_parameter", "format must be json or csv")
    return raw


def _primed(rows: Iterator[list[Any]]) -> Iterator[list[Any]]:
    """Fetch the first row at once: the query runs before the response starts."""
    first = next(rows, None)
    return rows if first is None else itertools.chain([first], rows)


def _closing(rows: Iterator[list[Any]], session: Session) -> Iterator[list[Any]]:
    """The rows, then the session closed as soon as the last one is read."""
    try:
        yield from rows
    finally:
        session.close()


def _json_response(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body) + "\n", mimetype="application/json")


def _json_list_response(key: str, columns: Sequence[str], rows: Iterator[list[Any]]) -> Response:
    """{"<key>": [...]} written item by item, so a long list never sits in memory."""

    def generate() -> Iterator[str]:
        yield f'{{"{key}": ['
        for n, row in enumerate(rows):
            item = json.dumps(dict(zip(columns, row, strict=True)))
            yield item if n == 0 else ", " + item
        yield "]}\n"

    return Response(generate(), mimetype="application/json")


def _csv_response(name: str, columns: Sequence[str], rows: Iterable[list[Any]]) -> Response:
    def generate() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for n, row in enumerate(rows, start=1):
            writer.writerow(safe_row(row))
            if n % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    response = Response(generate(), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    return response
