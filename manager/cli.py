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

from .db import begin_write
from .errors import ApiError
from .queries import is_number
from .stored_text import reason_problem, text_problem

db_cli = AppGroup("db", help="Schema migrations (Alembic).")
tokens_cli = AppGroup("tokens", help="Operator API tokens.")


def _engine() -> Any:
    return current_app.extensions["manager.engine"]


def _session() -> Any:
    return current_app.extensions["manager.sessions"]()


def _storable(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Refuse text no column can hold, as the API does: NUL, or an unpaired surrogate
    (which is how Python passes on an argument's bytes that are not UTF-8)."""
    problem = None if value is None else text_problem(value)
    if problem is not None:
        raise click.BadParameter(problem)
    return value


def _stop_reason(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """The API's rule for a stop reason: its length limit and storable text."""
    problem = None if value is None else reason_problem(value)
    if problem is not None:
        raise click.BadParameter(problem)
    return value


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
@click.argument("name", callback=_storable)
def tokens_create(name: str) -> None:
    """Create a token and print it once."""
    from .tokens import create_token

    with _session() as session, _api_errors():
        begin_write(session)
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
@click.argument("name", callback=_storable)
def tokens_revoke(name: str) -> None:
    """Revoke a token by name."""
    from .tokens import revoke_token

    with _session() as session, _api_errors():
        begin_write(session)
        revoke_token(session, name)
        session.commit()
    click.echo(f"token {name!r} revoked")


@click.command("tasks")
@click.option("--task", "task_id", callback=_storable, help="Show this task and its runs.")
@click.option("--status", type=click.Choice(["running", "stopping", "stopped", "failed"]))
@click.option("--owner", callback=_storable)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 500))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@with_appcontext
def tasks_command(
    task_id: str | None, status: str | None, owner: str | None, limit: int, fmt: str
) -> None:
    """List tasks, newest first; with --task, one task's state and every run of it."""
    if task_id is not None:
        if status is not None or owner is not None:
            raise click.UsageError("--task shows one task: leave out --status and --owner")
        _show_task(task_id, fmt)
        return
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


# The task's fields `tasks --task` prints above its runs, in this order.
TASK_FIELDS = (
    "task_id",
    "owner",
    "status",
    "stop_reason",
    "sequence",
    "runs",
    "first_seen_at",
    "started_at",
    "ended_at",
    "updated_at",
    "last_delivery_at",
)
RUN_COLUMNS = ("run", "owner", "started_at", "ended_at", "ended", "seconds")


def _show_task(task_id: str, fmt: str) -> None:
    """One task as GET /api/tasks/<id> shows its state and runs."""
    from .lifecycle import utcnow
    from .queries import find_task, run_json, task_json, task_runs

    settings = current_app.extensions["manager.settings"]
    with _session() as session, _api_errors():
        task = find_task(session, task_id, settings.zego_app_id)
        now = utcnow()
        body: dict[str, Any] = {
            "task": task_json(task),
            "runs": [run_json(run, now) for run in task_runs(session, task)],
        }
    if fmt == "json":
        click.echo(json.dumps(body, indent=2))
        return
    width = max(len(f) for f in TASK_FIELDS)
    for field in TASK_FIELDS:
        value = body["task"][field]
        click.echo(f"{field.ljust(width)}  {'' if value is None else value}".rstrip())
    click.echo()
    if not body["runs"]:
        click.echo("no runs yet")
        return
    blanks = {"started_at": "unknown", "ended": "running"}
    echo_table(
        RUN_COLUMNS,
        [
            [blanks.get(c, "") if run[c] is None else run[c] for c in RUN_COLUMNS]
            for run in body["runs"]
        ],
    )


MAX_WORKERS = 256


def _default_workers(raw: str) -> int:
    """WEB_CONCURRENCY, checked like every other setting; unset: 2 x CPU cores."""
    if not raw:
        return 2 * multiprocessing.cpu_count()
    if not is_number(raw) or not 1 <= int(raw) <= MAX_WORKERS:
        # 0 would start gunicorn with no workers at all, and a typo would be ignored.
        raise click.UsageError(
            f"WEB_CONCURRENCY must be a whole number from 1 to {MAX_WORKERS}, not {raw!r}"
        )
    return int(raw)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--workers",
    type=click.IntRange(1, MAX_WORKERS),
    help="default: $WEB_CONCURRENCY, else 2 x CPU cores",
)
@with_appcontext
def serve_command(host: str, port: int, workers: int | None) -> None:
    """Upgrade the schema, then serve wsgi.py with gunicorn."""
    from .migrate import MIGRATIONS, upgrade

    if workers is None:
        workers = _default_workers(os.environ.get("WEB_CONCURRENCY", "").strip())
    upgrade(_engine())
    env = dict(os.environ)
    # Must be set before prometheus_client is imported, hence a fresh gunicorn process.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="manager-metrics-"))
    click.echo(f"serving on http://{host}:{port} with {workers} workers", err=True)
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        "python:manager.gunicorn_conf",
        "--chdir",
        str(MIGRATIONS.parent),
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        "wsgi:app",
    ]
    os.execve(sys.executable, argv, env)  # noqa: S606 - our own interpreter, fixed arguments


@click.command("stop")
@click.argument("task_id", callback=_storable)
@click.option("--reason", callback=_stop_reason, help="why, recorded with the stop request")
@click.option("--force", is_flag=True, help="stop even if the task is recorded as stopped")
@with_appcontext
def stop_command(task_id: str, reason: str | None, force: bool) -> None:
    """Stop a task through StopCloudTranscode, as its recorded owner."""
    from . import get_dispatcher
    from .dispatch import stop_task_now
    from .stopping import WAIT_REASON_TEXT

    settings = current_app.extensions["manager.settings"]
    who = f"cli:{os.environ.get('USER') or os.environ.get('LOGNAME') or 'unknown'}"
    with _session() as session, _api_errors():
        stop, created = stop_task_now(
            session,
            get_dispatcher(),
            task_id,
            app_id=settings.zego_app_id,
            requested_by=who,
            reason=reason,
            force=force,
        )
    code = f" (ZEGO {stop.last_code}: {stop.last_message})" if stop.last_code is not None else ""
    if stop.state == "queued" and stop.wait_reason is not None:
        code += f" ({WAIT_REASON_TEXT[stop.wait_reason]})"
    prefix = "" if created else "already in flight: "
    click.echo(f"{prefix}stop request {stop.id} seq={stop.sequence} {stop.state}{code}")
    if stop.state == "failed":
        raise click.ClickException("ZEGOCLOUD refused the stop")


@click.command("worker")
@click.option("--once", is_flag=True, help="run one pass and exit")
@click.option(
    "--threads",
    default=64,
    show_default=True,
    type=click.IntRange(1, 512),
    help="calls to ZEGOCLOUD that may be in flight at once (sender threads and connections)",
)
@with_appcontext
def worker_command(once: bool, threads: int) -> None:
    """Send queued stop requests within the shared rate limit; re-stop stuck tasks."""
    import logging
    import signal
    import threading

    # Every attempt, wait and give-up is logged: show them, with time and level.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from .dispatch import make_dispatcher
    from .worker import StopWorker

    ext = current_app.extensions
    with _api_errors():
        dispatcher = make_dispatcher(
            ext["manager.settings"],
            ext.get("manager.autocommit_engine", ext["manager.engine"]),
            ext["manager.sessions"],
            "worker",
            pool_size=threads,
        )
    worker = StopWorker(
        dispatcher, threads=threads, nonce_max_age=ext["manager.settings"].callback_max_age
    )
    try:
        if once:
            click.echo(f"{worker.run_once()} attempts made")
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        click.echo(f"worker {dispatcher.name} running; Ctrl-C stops it", err=True)
        worker.run_forever(stop)
    finally:
        worker.close()


@click.command("fake-zego")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=int)
@click.option("--callback-url", default="http://127.0.0.1:8000/callbacks/zego", show_default=True)
@click.option("--rate-limit", default=100, show_default=True, type=int)
@click.option(
    "--answer-delay-ms",
    default=0,
    show_default=True,
    type=click.IntRange(0, 60_000),
    help="answer each call this long after counting and applying it",
)
@with_appcontext
def fake_zego_command(
    host: str, port: int, callback_url: str, rate_limit: int, answer_delay_ms: int
) -> None:
    """Serve a local stand-in for ZEGOCLOUD's API, signed with this instance's secrets."""
    from .zego.fake import FakeServer, FakeZego

    settings = current_app.extensions["manager.settings"]
    if settings.zego_app_id is None or not settings.zego_server_secret:
        raise click.ClickException("set ZEGO_APP_ID and ZEGO_SERVER_SECRET for the fake to check")
    if not settings.callback_secrets:
        raise click.ClickException("set ZEGO_CALLBACK_SECRET for the fake to sign callbacks")
    fake = FakeZego(
        app_id=settings.zego_app_id,
        server_secret=settings.zego_server_secret,
        callback_secret=settings.callback_secrets[0],
        callback_url=callback_url,
        rate_limit=rate_limit,
        answer_delay=answer_delay_ms / 1000,
    )
    server = FakeServer(fake, port=port, host=host)
    click.echo(f"fake ZEGOCLOUD API on {server.url} (ZEGO_API_URL); callbacks to {callback_url}")
    server.serve_forever()


@click.command("demo")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--fake-port", default=8900, show_default=True, type=int)
@click.option("--exit", "then_exit", is_flag=True, help="stop everything once the traffic is done")
def demo_command(port: int, fake_port: int, then_exit: bool) -> None:
    """Run the service, the fake ZEGOCLOUD, a worker and sample traffic, on 127.0.0.1."""
    import threading

    from .demo import Demo

    demo = Demo(port, fake_port, click.echo)
    try:
        demo.start()
        demo.traffic()
        if not then_exit:
            click.echo("\nstill running: explore the API and the dashboard; Ctrl-C stops it all")
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        demo.stop()


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
    app.cli.add_command(stop_command)
    app.cli.add_command(worker_command)
    app.cli.add_command(fake_zego_command)
    app.cli.add_command(demo_command)

    from .rebuild_cli import rebuild_command
    from .report_cli import report_command

    app.cli.add_command(report_command)
    app.cli.add_command(rebuild_command)


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
