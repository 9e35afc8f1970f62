"""`manager rebuild [--task ID] [--dry-run]`: recompute tasks and runs from their events."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext

from manager.callbacks.rebuild import Rebuilt, rebuild
from manager.clock import utcnow
from manager.db import WRITE_OPTION
from manager.stored_text import text_problem


@click.command("rebuild")
@click.option("--task", "task_id", help="Only this task (its TaskId).")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@with_appcontext
def rebuild_command(task_id: str | None, dry_run: bool) -> None:
    """Recompute tasks and their runs from the stored events; print what changed."""
    if task_id is not None and (problem := text_problem(task_id)) is not None:
        raise click.BadParameter(problem, param_hint="--task")
    engine = current_app.extensions["manager.engine"]
    now = utcnow()
    changed = 0
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        # A transaction per batch: callbacks for the batch's tasks wait for its locks
        # only while it is worked on.
        for batch in rebuild(conn, task_id=task_id, dry_run=dry_run, now=now):
            conn.commit()
            for task in batch:
                click.echo(_line(task))
            changed += len(batch)
        conn.commit()
    verb = "would change" if dry_run else "changed"
    click.echo(f"{changed} task(s) {verb}" + ("" if task_id is None else f" (task {task_id!r})"))


def _line(task: Rebuilt) -> str:
    before, after = task.before, task.after
    parts = [f"{task.task_id}:"]
    if before.status != after.status:
        parts.append(f"status {before.status} -> {after.status}")
    if before.runs != after.runs:
        parts.append(f"runs {before.runs} -> {after.runs}")
    if before.transcoding_seconds != after.transcoding_seconds:
        parts.append(f"transcoding {before.transcoding_seconds} s -> {after.transcoding_seconds} s")
    if len(parts) == 1:
        parts.append("times or owner of its runs")
    return " ".join(parts)
