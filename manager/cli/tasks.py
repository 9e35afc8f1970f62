"""`manager tasks`: list tasks, or show one with its runs."""

from __future__ import annotations

import json
from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext

from manager.cli.common import echo_table, new_session, storable
from manager.cli.errors import domain_errors
from manager.clock import utcnow
from manager.tasks.queries import TaskFilter, find_task, list_tasks, task_runs
from manager.tasks.shapes import run_json, task_json
from manager.vocabulary import TaskStatus, values


@click.command("tasks")
@click.option("--task", "task_id", callback=storable, help="Show this task and its runs.")
@click.option("--status", type=click.Choice(values(TaskStatus)))
@click.option("--owner", callback=storable)
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

    settings = current_app.extensions["manager.settings"]
    with new_session() as session:
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

    settings = current_app.extensions["manager.settings"]
    with new_session() as session, domain_errors():
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
