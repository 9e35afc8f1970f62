"""A callback is recorded whole or not at all, on every path PostgreSQL takes it by."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from manager.callbacks import fast_path, pg_statements, task_rows
from manager.callbacks import history as task_history
from manager.models import CallbackNonce, Delivery, Task, TaskRun
from manager.web import callbacks as web_callbacks

from ..conftest import callback


def test_a_failing_write_back_keeps_nothing(
    client: FlaskClient, db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last statement fails (on PostgreSQL only at the COMMIT's sync): the answer is
    a 503, and neither the nonce, the task nor the delivery is kept, so ZEGOCLOUD's
    retry of the same body is applied normally."""
    real = task_rows.task_values

    def broken(task: Any, change: Any) -> dict[str, Any]:
        return {**real(task, change), "status": "no-such-status"}  # breaks a CHECK

    body = json.dumps(callback(task_id="tx-1", sequence=1))
    monkeypatch.setattr(task_rows, "task_values", broken)  # write_back's (SQLite)
    monkeypatch.setattr(pg_statements, "task_values", broken)  # pg_values' (PostgreSQL)
    failed = client.post("/callbacks/zego", data=body, content_type="application/json")
    assert failed.status_code == 503
    assert failed.json["error"]["code"] == "database_unavailable"
    db.rollback()
    for model in (Task, Delivery, CallbackNonce, TaskRun):
        assert db.execute(select(func.count()).select_from(model)).scalar_one() == 0, model

    monkeypatch.setattr(task_rows, "task_values", real)
    monkeypatch.setattr(pg_statements, "task_values", real)
    retried = client.post("/callbacks/zego", data=body, content_type="application/json")
    assert retried.json == {"code": 0, "verdict": "applied"}
    db.rollback()
    assert db.execute(select(Task.status)).scalar_one() == "running"


@pytest.mark.postgres
def test_a_task_changed_between_read_and_write_leaves_it_to_the_transaction(
    app: Any, client: FlaskClient, db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimistic path reads the task unlocked; if another writer changes the row
    before its one write, that write does nothing at all (no nonce, no delivery), and
    the locked transaction applies the callback to the row as it now is."""
    assert client.post(
        "/callbacks/zego",
        data=json.dumps(callback(task_id="opt-1", sequence=1)),
        content_type="application/json",
    ).json == {"code": 0, "verdict": "applied"}
    real_extend = task_history.extend
    engine = app.extensions["manager.engine"]
    calls = []

    def extend_while_another_writes(history: Any, event: Any) -> Any:
        calls.append(event)
        if len(calls) == 1:  # between the optimistic read and its write
            with engine.begin() as other:
                other.execute(update(Task).where(Task.task_id == "opt-1").values(owner="other"))
        return real_extend(history, event)

    monkeypatch.setattr(fast_path, "extend", extend_while_another_writes)  # the optimistic read
    monkeypatch.setattr(task_history, "extend", extend_while_another_writes)  # the transaction's
    optimistic = fast_path.apply_optimistically
    outcomes = []
    monkeypatch.setattr(
        web_callbacks,
        "apply_optimistically",
        lambda *a, **k: outcomes.append(optimistic(*a, **k)) or outcomes[-1],
    )
    body = callback(task_id="opt-1", sequence=2, status="TranscodeUpdated", user_id="user-1")
    answer = client.post("/callbacks/zego", data=json.dumps(body), content_type="application/json")
    assert answer.json == {"code": 0, "verdict": "applied"}
    assert outcomes == [None]  # the optimistic write found the row changed
    assert len(calls) == 2  # and the transaction applied the rules again
    db.rollback()
    task = db.execute(select(Task).where(Task.task_id == "opt-1")).scalar_one()
    assert (task.owner, task.state_seq) == ("user-1", 2)
    assert db.execute(select(func.count()).select_from(Delivery)).scalar_one() == 2
