"""`manager rebuild` and migration 0013: tasks and runs recomputed from their events."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import Engine, delete, select, text, update
from sqlalchemy.orm import Session

from manager.migrate import upgrade
from manager.models import RunDay, Task, TaskRun

from ..conftest import callback


def deliver(client: FlaskClient, event: str = "transcode_start", **kw: object) -> None:
    body = json.dumps(callback(event, **kw))  # type: ignore[arg-type]
    assert (
        client.post("/callbacks/zego", data=body, content_type="application/json").status_code
        == 200
    )


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def runs(db: Session, task_id: str) -> list[tuple[object, ...]]:
    db.rollback()
    return [
        tuple(r)
        for r in db.execute(
            select(TaskRun.run_no, TaskRun.started_at, TaskRun.ended_at, TaskRun.stop_reason)
            .join(Task, Task.id == TaskRun.task_pk)
            .where(Task.task_id == task_id)
            .order_by(TaskRun.run_no)
        )
    ]


def test_rebuild_restores_what_the_events_make(
    client: FlaskClient, runner: FlaskCliRunner, db: Session
) -> None:
    t0 = int(time.time()) - 200
    deliver(client, task_id="r-1", sequence=1, timestamp=t0)
    deliver(client, task_id="r-1", sequence=2, timestamp=t0 + 50)
    deliver(client, "transcode_stop", task_id="r-1", sequence=3, timestamp=t0 + 90)
    deliver(client, task_id="r-2", sequence=1, timestamp=t0)
    expected = runs(db, "r-1")
    assert expected == [(1, at(t0), at(t0 + 50), None), (2, at(t0 + 50), at(t0 + 90), 0)]
    # Damage r-1 as the old rules could leave it: one run, still running.
    pk = db.execute(select(Task.id).where(Task.task_id == "r-1")).scalar_one()
    db.execute(delete(TaskRun).where(TaskRun.task_pk == pk, TaskRun.run_no == 2))
    db.execute(update(Task).where(Task.id == pk).values(status="running", runs=1, ended_at=None))
    db.execute(update(TaskRun).where(TaskRun.task_pk == pk).values(ended_at=None))
    db.commit()

    dry = runner.invoke(args=["rebuild", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "r-1: status running -> stopped runs 1 -> 2" in dry.output
    assert "1 task(s) would change" in dry.output
    assert runs(db, "r-1") == [(1, at(t0), None, None)]  # nothing written

    done = runner.invoke(args=["rebuild"])
    assert done.exit_code == 0, done.output
    assert "r-1: status running -> stopped runs 1 -> 2" in done.output
    assert "1 task(s) changed" in done.output
    assert runs(db, "r-1") == expected
    task = db.execute(select(Task).where(Task.task_id == "r-1")).scalar_one()
    assert (task.status, task.runs, task.ended_at, task.stop_reason) == (
        "stopped",
        2,
        at(t0 + 90),
        0,
    )

    again = runner.invoke(args=["rebuild", "--task", "r-1"])
    assert again.exit_code == 0, again.output
    assert again.output.strip() == "0 task(s) changed (task 'r-1')"


def test_rebuild_of_one_task_leaves_the_others(
    client: FlaskClient, runner: FlaskCliRunner, db: Session
) -> None:
    t0 = int(time.time()) - 200
    for task_id in ("a", "b"):
        deliver(client, task_id=task_id, sequence=1, timestamp=t0)
        deliver(client, "transcode_stop", task_id=task_id, sequence=2, timestamp=t0 + 30)
    db.execute(update(Task).values(status="running"))
    db.commit()
    result = runner.invoke(args=["rebuild", "--task", "a"])
    assert result.exit_code == 0, result.output
    db.rollback()
    statuses = {
        task_id: status for task_id, status in db.execute(select(Task.task_id, Task.status))
    }
    assert statuses == {"a": "stopped", "b": "running"}


def test_a_rebuild_that_changes_runs_empties_the_daily_cache(
    client: FlaskClient, runner: FlaskCliRunner, db: Session
) -> None:
    deliver(client, task_id="c", sequence=1)
    db.add(
        RunDay(
            day=datetime(2026, 1, 1).date(),
            started=1,
            stopped=0,
            failed=0,
            ended_unseen=0,
            busy_us=0,
        )
    )
    db.execute(delete(TaskRun))
    db.commit()
    assert runner.invoke(args=["rebuild"]).exit_code == 0
    db.rollback()
    assert db.execute(select(RunDay)).first() is None


def test_rebuild_refuses_an_unstorable_task_id(runner: FlaskCliRunner, app: Flask) -> None:
    result = runner.invoke(args=["rebuild", "--task", "a\x00b"])
    assert result.exit_code == 2
    assert "--task" in result.output


# --- the migration -------------------------------------------------------------------------


def test_the_upgrade_corrects_histories_the_old_rules_recorded(scratch_engine: Engine) -> None:
    """Arrival [start 1, stop 3, start 2] left two overlapping stopped runs (130 s);
    upgrading recomputes one run ended unseen and one stopped (90 s)."""
    upgrade(scratch_engine, "0012")
    t0 = 1_796_000_000
    with scratch_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (id, app_id, task_id, owner, status, stop_reason, state_seq,"
                " state_rank, max_seq, owner_seq, owner_rank, runs, run_floor_seq,"
                " run_start_seq, run_start_rank, end_seq, started_at, ended_at, first_seen_at,"
                " updated_at) VALUES (1, 1, 'old', 'u', 'stopped', 0, 3, 6, 3, 2, 2, 2, 1,"
                " 2, 2, 3, :s2, :e, :s1, :e)"
            ),
            {"s1": at(t0), "s2": at(t0 + 50), "e": at(t0 + 90)},
        )
        for run_no, start in ((1, t0), (2, t0 + 50)):
            conn.execute(
                text(
                    "INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at,"
                    " stop_reason) VALUES (1, :n, 'u', :s, :e, 0)"
                ),
                {"n": run_no, "s": at(start), "e": at(t0 + 90)},
            )
        for seq, event, status, offset in (
            (1, "transcode_start", "TranscodeStarted", 0),
            (3, "transcode_stop", "TranscodeStopped", 90),
            (2, "transcode_start", "TranscodeStarted", 50),
        ):
            conn.execute(
                text(
                    "INSERT INTO deliveries (received_at, verdict, event_key, task_pk, app_id,"
                    " event, task_id, user_id, sequence, status, stop_reason, zego_timestamp,"
                    " nonce, body_size, raw_body) VALUES (:r, 'applied', :k, 1, 1, :ev, 'old',"
                    " 'u', :seq, :st, :sr, :ts, :k, 0, :b)"
                ),
                {
                    "r": at(t0 + 100),
                    "k": f"key-{seq}",
                    "ev": event,
                    "seq": seq,
                    "st": status,
                    "sr": 0 if event == "transcode_stop" else None,
                    "ts": t0 + offset,
                    "b": b"",
                },
            )
    upgrade(scratch_engine)
    with scratch_engine.connect() as conn:
        rows = conn.execute(
            select(
                TaskRun.run_no, TaskRun.started_at, TaskRun.ended_at, TaskRun.stop_reason
            ).order_by(TaskRun.run_no)
        ).all()
        task = conn.execute(text("SELECT status, runs, run_start_seen FROM tasks")).one()
    assert [tuple(r) for r in rows] == [
        (1, at(t0), at(t0 + 50), None),
        (2, at(t0 + 50), at(t0 + 90), 0),
    ]
    assert (task.status, task.runs, bool(task.run_start_seen)) == ("stopped", 2, True)
