"""The `manager` command line: a Flask CLI group with one AppGroup per concern."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, FlaskGroup, with_appcontext

from .errors import ApiError

db_cli = AppGroup("db", help="Schema migrations (Alembic).")
tokens_cli = AppGroup("tokens", help="Operator API tokens.")


def _engine() -> Any:
    return current_app.extensions["manager.engine"]


def _session() -> Any:
    return current_app.extensions["manager.sessions"]()


@db_cli.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the schema (default: to the latest revision)."""
    from .migrate import upgrade

    upgrade(_engine(), revision)
    click.echo(f"upgraded to {revision}")


@db_cli.command("downgrade")
@click.argument("revision", default="-1")
def db_downgrade(revision: str) -> None:
    """Downgrade the schema (default: one revision)."""
    from .migrate import downgrade

    downgrade(_engine(), revision)
    click.echo(f"downgraded to {revision}")


@db_cli.command("current")
def db_current() -> None:
    """Show the schema's revision and whether it is the latest."""
    from .migrate import current_revisions, head_revisions

    engine = _engine()
    with engine.connect() as connection:
        current = current_revisions(connection)
    heads = head_revisions(engine)
    state = "head" if set(current) == set(heads) else f"behind (head is {', '.join(heads)})"
    click.echo(f"{', '.join(current) or '(empty database)'} {state}")


@tokens_cli.command("create")
@click.argument("name")
def tokens_create(name: str) -> None:
    """Create a token and print it once."""
    from .tokens import create_token

    with _session() as session, _api_errors():
        token = create_token(session, name)
        session.commit()
    click.echo(token)
    click.echo(f"token {name!r} created; it is not shown again.", err=True)


@tokens_cli.command("list")
def tokens_list() -> None:
    """List tokens (names and dates only)."""
    from .tokens import list_tokens

    with _session() as session:
        rows = [
            (t.name, t.created_at, t.last_used_at or "", "revoked" if t.revoked_at else "active")
            for t in list_tokens(session)
        ]
    echo_table(["name", "created_at", "last_used_at", "state"], rows)


@tokens_cli.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Revoke a token by name."""
    from .tokens import revoke_token

    with _session() as session, _api_errors():
        revoke_token(session, name)
        session.commit()
    click.echo(f"token {name!r} revoked")


@click.command("tasks")
@click.option("--status", type=click.Choice(["running", "stopping", "stopped", "failed"]))
@click.option("--owner")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 500))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@with_appcontext
def tasks_command(status: str | None, owner: str | None, limit: int, fmt: str) -> None:
    """List tasks, newest first."""
    from .queries import TaskFilter, list_tasks, task_json

    settings = current_app.extensions["manager.settings"]
    with _session() as session:
        flt = TaskFilter(status=status, owner=owner, app_id=settings.zego_app_id)
        rows = [task_json(t) for t in list_tasks(session, flt, limit, None)[0]]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["task_id", "owner", "status", "sequence", "started_at", "ended_at"]
    echo_table(columns, [[r[c] if r[c] is not None else "" for c in columns] for r in rows])


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", type=int, help="default: $WEB_CONCURRENCY, else 2 x CPU cores")
@with_appcontext
def serve_command(host: str, port: int, workers: int | None) -> None:
    """Upgrade the schema, then serve wsgi.py with gunicorn."""
    from .migrate import MIGRATIONS, upgrade

    upgrade(_engine())
    if workers is None:
        env_workers = os.environ.get("WEB_CONCURRENCY", "")
        workers = int(env_workers) if env_workers.isdigit() else 2 * multiprocessing.cpu_count()
    env = dict(os.environ)
    # Must be set before prometheus_client is imported, hence a fresh gunicorn process.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="manager-metrics-"))
    click.echo(f"serving on http://{host}:{port} with {workers} workers", err=True)
    argv = [
        sys.executable, "-m", "gunicorn",
        "--config", "python:manager.gunicorn_conf",
        "--chdir", str(MIGRATIONS.parent),
        "--bind", f"{host}:{port}",
        "--workers", str(workers),
        "wsgi:app",
    ]  # fmt: skip
    os.execve(sys.executable, argv, env)  # noqa: S606 - our own interpreter, fixed arguments


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


class _api_errors:  # noqa: N801 - used as a context manager, reads as a phrase
    """Turn a domain error into a ClickException so the exit code is non-zero."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        if isinstance(exc, ApiError):
            raise click.ClickException(exc.message)


def register_commands(app: Flask) -> None:
    app.cli.add_command(db_cli)
    app.cli.add_command(tokens_cli)
    app.cli.add_command(tasks_command)
    app.cli.add_command(serve_command)


def _create_app() -> Flask:
    from . import create_app
    from .config import ConfigError

    try:
        return create_app()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


@click.group(cls=FlaskGroup, create_app=_create_app, add_default_commands=False)
def main() -> None:
    """Lifecycle manager for ZEGOCLOUD Single Stream Transcoding tasks."""
