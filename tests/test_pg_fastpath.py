"""PostgreSQL's one-call path (manager/pg_fastpath.py, manager_apply_callback()): it
writes a delivery whole or not at all, and leaves every case it does not settle to the
locked path. tests/test_pg_function.py holds its rules to the locked path's."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from manager.lifecycle import Outcome, utcnow
from manager.models import CallbackNonce, Delivery, Task, TaskRun
from manager.pg_fastpath import try_apply
from manager.zego.callbacks import Callback, parse_callback

from .conftest import APP_ID, callback
from .test_callback_race import INSERT_TASK, post_while_another_transaction_holds

pytestmark = pytest.mark.postgres


def parsed(**kwargs: Any) -> Callback:
    return parse_callback(callback(**kwargs))


def apply_fast(engine: Engine, cb: Callback) -> Outcome | None:
    with engine.connect() as conn:
        return try_apply(
            conn, cb, raw_body=b"{}", body_size=2, received_at=utcnow(), remote_addr=None
        )


def counts(db: Session) -> tuple[int, int, int, int]:
    tables = (Task, Delivery, TaskRun, CallbackNonce)
    result = tuple(db.execute(select(func.count()).select_from(t)).scalar_one() for t in tables)
    db.rollback()
    return result  # type: ignore[return-value]


def taken(path: str) -> float:
    """Callbacks applied so far by `path` (fast or locked)."""
    return REGISTRY.get_sample_value("manager_callback_paths_total", {"path": path}) or 0.0


def post(client: FlaskClient, body: dict[str, object]) -> Any:
    return client.post("/callbacks/zego", data=json.dumps(body), content_type="application/json")


def test_a_first_start_is_one_call_with_its_run(app: Flask, db: Session) -> None:
    engine = app.extensions["manager.autocommit_engine"]
    outcome = apply_fast(engine, parsed(task_id="f-1", user_id="u-1", sequence=3))
    assert outcome is not None
    assert (outcome.verdict, outcome.reason) == ("applied", None)
    task = db.execute(select(Task)).scalar_one()
    assert (task.id, task.status, task.owner, task.runs, task.max_seq) == (
        outcome.task_pk,
        "running",
        "u-1",
        1,
        3,
    )
    run = db.execute(select(TaskRun)).scalar_one()
    assert (run.task_pk, run.run_no, run.owner, run.ended_at) == (task.id, 1, "u-1", None)
    assert counts(db) == (1, 1, 1, 1)


def test_a_new_task_whose_nonce_is_taken_writes_nothing(app: Flask, db: Session) -> None:
    engine = app.extensions["manager.autocommit_engine"]
    first = parsed(task_id="f-1", nonce="0123456789abcdef")
    assert apply_fast(engine, first) is not None
    # The same Timestamp and Nonce with another task: the new task must not stay.
    forged = parse_callback(dict(callback(task_id="f-1", nonce="0123456789abcdef"), TaskId="f-2"))
    assert apply_fast(engine, forged) is None
    assert counts(db) == (1, 1, 1, 1)
    assert db.execute(select(Task.task_id)).scalars().all() == ["f-1"]


def test_an_update_of_an_unknown_task_creates_it(app: Flask, db: Session) -> None:
    engine = app.extensions["manager.autocommit_engine"]
    outcome = apply_fast(engine, parsed(task_id="f-1", status="TranscodeUpdated", sequence=2))
    assert outcome is not None
    assert outcome.verdict == "applied"
    assert counts(db) == (1, 1, 1, 1)


def test_a_start_of_an_existing_task_reads_it_and_applies(app: Flask, db: Session) -> None:
    engine = app.extensions["manager.autocommit_engine"]
    assert apply_fast(engine, parsed(task_id="f-1", sequence=1)) is not None
    stop = parsed(event="transcode_stop", task_id="f-1", sequence=2, stop_reason=0)
    assert apply_fast(engine, stop) is not None
    restart = apply_fast(engine, parsed(task_id="f-1", sequence=3))
    assert restart is not None
    assert restart.verdict == "applied"
    task = db.execute(select(Task)).scalar_one()
    assert (task.status, task.runs) == ("running", 2)
    runs = db.execute(select(TaskRun.run_no, TaskRun.stop_reason).order_by(TaskRun.run_no))
    assert runs.all() == [(1, 0), (2, None)]


def test_a_resend_with_a_new_nonce_is_a_duplicate_in_the_same_call(app: Flask, db: Session) -> None:
    engine = app.extensions["manager.autocommit_engine"]
    assert apply_fast(engine, parsed(task_id="f-1", sequence=5)) is not None
    db.execute(text("UPDATE tasks SET last_delivery_at = '2000-01-01'"))
    db.commit()
    resend = parsed(task_id="f-1", sequence=5, timestamp=int(time.time()) + 3)
    outcome = apply_fast(engine, resend)
    assert outcome is not None
    assert (outcome.verdict, outcome.reason) == ("duplicate", "same_event")
    last = db.execute(select(Delivery).order_by(Delivery.id.desc())).scalars().first()
    assert last is not None
    assert (last.verdict, last.event_key, last.id) == (
        "duplicate",
        None,
        outcome.delivery_id,
    )
    touched = db.execute(select(Task.last_delivery_at)).scalar_one()
    assert touched is not None
    assert touched > datetime(2000, 1, 2)
    assert counts(db) == (1, 2, 1, 2)  # the new nonce is claimed


def test_a_seen_nonce_is_left_to_the_locked_path(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    engine = app.extensions["manager.autocommit_engine"]
    body = callback(task_id="f-1", status="TranscodeUpdated", sequence=2)
    assert post(client, body).json["verdict"] == "applied"
    assert apply_fast(engine, parse_callback(body)) is None
    assert counts(db) == (1, 1, 1, 1)
    # …which tells a retransmission by its body.
    assert post(client, body).json == {"code": 0, "verdict": "duplicate"}


def test_a_task_created_meanwhile_is_locked_and_applied_in_the_same_call(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    """Another transaction creates the task first: the function's insert waits for it,
    finds the task there, and applies the delivery to it, without the locked path."""
    engine = app.extensions["manager.engine"]  # a transaction, to hold the new row
    fast, locked = taken("fast"), taken("locked")
    body = callback(task_id="f-1", user_id="u-7", sequence=4)
    with engine.connect() as other:
        other.execute(INSERT_TASK, {"app_id": APP_ID, "task_id": "f-1"})
        answer = post_while_another_transaction_holds(client, db, other, body)
    assert answer == {"status": 200, "json": {"code": 0, "verdict": "applied"}}
    assert (taken("fast") - fast, taken("locked") - locked) == (1, 0)
    task = db.execute(select(Task)).scalar_one()
    assert (task.status, task.owner, task.max_seq, task.runs) == ("running", "u-7", 4, 1)
    assert counts(db) == (1, 1, 1, 1)


def test_a_new_task_whose_event_key_is_taken_writes_nothing(app: Flask, db: Session) -> None:
    """Only a deleted task can leave its event key behind; the locked path sorts it out."""
    engine = app.extensions["manager.autocommit_engine"]
    cb = parsed(task_id="f-1", sequence=2)
    assert apply_fast(engine, cb) is not None
    db.execute(text("UPDATE deliveries SET task_pk = NULL"))
    db.execute(text("DELETE FROM tasks"))
    db.commit()
    again = parsed(task_id="f-1", sequence=2, timestamp=int(time.time()) + 3)
    assert again.event_key() == cb.event_key()
    assert apply_fast(engine, again) is None
    assert counts(db) == (0, 1, 0, 1)


def test_a_lock_held_without_a_write_is_waited_for_then_applied(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    """A transaction that only locks the task (as the locked path does for a duplicate)
    leaves its row version as it was: the write waits for it, then goes ahead."""
    engine = app.extensions["manager.engine"]  # a transaction, to hold the lock
    assert post(client, callback(task_id="f-1", sequence=1)).status_code == 200
    body = callback(task_id="f-1", status="TranscodeUpdated", sequence=2)
    with engine.connect() as other:
        other.exec_driver_sql("SELECT id FROM tasks WHERE task_id = 'f-1' FOR UPDATE")
        answer = post_while_another_transaction_holds(client, db, other, body)
    assert answer == {"status": 200, "json": {"code": 0, "verdict": "applied"}}
    assert db.execute(select(Task.max_seq)).scalar_one() == 2


def test_the_path_each_delivery_took_is_counted(client: FlaskClient) -> None:
    fast, locked = taken("fast"), taken("locked")
    body = callback(task_id="f-1")
    assert post(client, body).json["verdict"] == "applied"
    assert (taken("fast") - fast, taken("locked") - locked) == (1, 0)
    assert post(client, body).json["verdict"] == "duplicate"  # its nonce was seen
    assert (taken("fast") - fast, taken("locked") - locked) == (1, 1)
