"""A callback's transaction is all or nothing, on PostgreSQL's pipelined path too."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager import lifecycle
from manager.models import CallbackNonce, Delivery, Task, TaskRun

from .conftest import callback


def test_a_failing_write_back_keeps_nothing(
    client: FlaskClient, db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last statement fails (on PostgreSQL only at the COMMIT's sync): the answer is
    a 503, and neither the nonce, the task nor the delivery is kept, so ZEGOCLOUD's
    retry of the same body is applied normally."""
    real = lifecycle.task_values

    def broken(task: Any, change: Any) -> dict[str, Any]:
        return {**real(task, change), "status": "no-such-status"}  # breaks a CHECK

    body = json.dumps(callback(task_id="tx-1", sequence=1))
    monkeypatch.setattr(lifecycle, "task_values", broken)
    failed = client.post("/callbacks/zego", data=body, content_type="application/json")
    assert failed.status_code == 503
    assert failed.json["error"]["code"] == "database_unavailable"
    db.rollback()
    for model in (Task, Delivery, CallbackNonce, TaskRun):
        assert db.execute(select(func.count()).select_from(model)).scalar_one() == 0, model

    monkeypatch.setattr(lifecycle, "task_values", real)
    retried = client.post("/callbacks/zego", data=body, content_type="application/json")
    assert retried.json == {"code": 0, "verdict": "applied"}
    db.rollback()
    assert db.execute(select(Task.status)).scalar_one() == "running"
