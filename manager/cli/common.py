"""What the commands share: the app's engine and sessions, argument checks, tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import click
from flask import current_app

from manager.stored_text import reason_problem, text_problem


def app_engine() -> Any:
    return current_app.extensions["manager.engine"]


def new_session() -> Any:
    return current_app.extensions["manager.sessions"]()


def storable(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Refuse an identifier by the rule callbacks and the API follow (manager/stored_text.py):
    control characters, or an unpaired surrogate (which is how Python passes on an
    argument's bytes that are not UTF-8)."""
    problem = None if value is None else text_problem(value)
    if problem is not None:
        raise click.BadParameter(problem)
    return value


def stop_reason(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """The API's rule for a stop reason: its length limit and storable text."""
    problem = None if value is None else reason_problem(value)
    if problem is not None:
        raise click.BadParameter(problem)
    return value


def echo_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print rows as an aligned plain-text table."""
    text_rows = [[str(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in text_rows:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=True)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in text_rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
