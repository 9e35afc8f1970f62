"""A task created by another transaction while a callback waits to create it (PostgreSQL).

The callback's first statement inserts the task or locks the existing row; when another
transaction inserts the same task first and commits while the statement waits, the row
is newer than the statement's snapshot, and the callback must lock it in a statement
of its own rather than fail.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

from manager.models import Delivery, Task

from ..conftest import APP_ID, callback

pytestmark = pytest.mark.postgres

# A new task's row as the callback path creates it, before its first delivery applies.
INSERT_TASK = text(
    "INSERT INTO tasks (app_id, task_id, status, state_seq, state_rank, max_seq, runs,"
    " run_start_seen, first_seen_at, updated_at)"
    " VALUES (:app_id, :task_id, 'running', -1, 0, -1, 0, false,"
    " now() AT TIME ZONE 'utc', now() AT TIME ZONE 'utc')"
)


def wait_for_lock_wait(db: Session, pids_before: set[int]) -> None:
    """Until a backend other than those in `pids_before` waits on a lock (60 s at most)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        waiting = db.execute(
            text(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalars()
        db.rollback()
        if set(waiting) - pids_before:
            return
        time.sleep(0.02)
    pytest.fail("the callback never waited for the other transaction's insert")


def post_while_another_transaction_holds(
    client: FlaskClient, db: Session, other: Connection, body: dict[str, object]
) -> dict[str, Any]:
    """POST `body` from a thread, let it wait for a lock of `other`'s, then commit
    `other`; the answer's status and JSON."""
    answer: dict[str, Any] = {}

    def deliver() -> None:
        response = client.post(
            "/callbacks/zego", data=json.dumps(body), content_type="application/json"
        )
        answer.update(status=response.status_code, json=response.json)

    others = {other.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()}
    thread = threading.Thread(target=deliver)
    thread.start()
    try:
        wait_for_lock_wait(db, others)
    finally:
        other.commit()
        thread.join(timeout=60)
    assert not thread.is_alive()
    return answer


def test_task_created_meanwhile_by_another_transaction_is_locked_and_applied(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    engine = app.extensions["manager.engine"]
    body = callback(task_id="race-1", user_id="owner-r", sequence=4)
    with engine.connect() as other:
        other.execute(INSERT_TASK, {"app_id": APP_ID, "task_id": "race-1"})
        answer = post_while_another_transaction_holds(client, db, other, body)

    assert answer == {"status": 200, "json": {"code": 0, "verdict": "applied"}}
    task = db.execute(select(Task).where(Task.task_id == "race-1")).scalar_one()
    assert (task.status, task.owner, task.max_seq, task.runs) == ("running", "owner-r", 4, 1)
    delivery = db.execute(select(Delivery)).scalar_one()
    assert (delivery.task_pk, delivery.verdict) == (task.id, "applied")
