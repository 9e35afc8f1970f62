"""DELIVERY_RETENTION_DAYS for the outbound events: old events go once nothing is
pending for them; a pending one stays, however old."""

from __future__ import annotations

import time
from datetime import timedelta

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.db import write_connection
from manager.events.retention import prune_events
from manager.models import Event, EventAttempt, EventSend, Task

from ..conftest import callback
from .conftest import drain, sender_for, subscribe
from .receiver import Receiver


def test_old_events_go_once_nothing_is_pending_for_them(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    t = int(time.time()) - 60
    for task_id in ("old-done", "old-pending", "recent"):
        body = callback(task_id=task_id, sequence=1, timestamp=t)
        assert client.post("/callbacks/zego", json=body).status_code == 200
    drain(sender_for(app), app)
    engine = app.extensions["manager.engine"]
    now = utcnow()
    with write_connection(engine) as conn:
        olds = select(Task.id).where(Task.task_id.in_(["old-done", "old-pending"]))
        conn.execute(
            update(Event).where(Event.task_pk.in_(olds)).values(created_at=now - timedelta(days=91))
        )
        pending = select(Task.id).where(Task.task_id == "old-pending")
        conn.execute(
            update(EventSend).where(EventSend.task_pk.in_(pending)).values(state="pending")
        )

    assert prune_events(engine, now=now, retention_days=90, batch_size=1) == 1

    db.rollback()
    kept = db.execute(
        select(Task.task_id).join(Event, Event.task_pk == Task.id).order_by(Task.task_id)
    ).scalars()
    assert list(kept) == ["old-pending", "recent"]
    assert db.execute(select(func.count()).select_from(EventSend)).scalar_one() == 2
    assert db.execute(select(func.count()).select_from(EventAttempt)).scalar_one() == 2
    # The tasks themselves stay, versions and all.
    assert db.execute(select(func.sum(Task.version))).scalar_one() == 3
