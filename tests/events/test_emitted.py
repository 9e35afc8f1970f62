"""Which events each change of a task emits, through the webhook and the stop path, on
the suite's database: types, versions, bodies, and the subscriptions that take them."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.events.subscriptions import disable_subscription
from manager.models import Event, EventSend, Task

from ..callbacks.lifecycles import Step
from ..callbacks.test_history_property import accept_stop
from ..conftest import callback
from .conftest import subscribe
from .receiver import Receiver


def post(client: FlaskClient, *args: Any, **kwargs: Any) -> dict[str, Any]:
    response = client.post("/callbacks/zego", json=callback(*args, **kwargs))
    assert response.status_code == 200, response.json
    body: dict[str, Any] = response.json  # type: ignore[assignment]
    return body


def events(db: Session, task_id: str = "task-1") -> list[tuple[int, str, dict[str, Any]]]:
    db.rollback()
    rows = db.execute(
        select(Event.version, Event.type, Event.body)
        .join(Task, Task.id == Event.task_pk)
        .where(Task.task_id == task_id)
        .order_by(Event.version)
    )
    return [(v, t, json.loads(b)) for v, t, b in rows]


def types(db: Session, task_id: str = "task-1") -> list[str]:
    return [t for _, t, _ in events(db, task_id)]


def test_a_lifecycle_emits_started_updated_run_ended_and_stopped(
    app: Flask, client: FlaskClient, db: Session, receiver: Receiver, auth: dict[str, str]
) -> None:
    subscribe(app, receiver)
    t = int(time.time()) - 60
    post(client, sequence=1, timestamp=t)
    details = {"Input": {"StreamId": "in"}, "Outputs": [{"StreamId": "o2", "Width": 640}]}
    post(client, sequence=2, status="TranscodeUpdated", timestamp=t + 5, details=details)
    post(client, "transcode_stop", sequence=3, timestamp=t + 30, user_id="op")
    emitted = events(db)
    assert [(v, kind) for v, kind, _ in emitted] == [
        (1, "task.started"),
        (2, "task.updated"),
        (3, "run.ended"),
        (4, "task.stopped"),
    ]
    started, updated, ended, stopped = (body for _, _, body in emitted)
    assert started["type"] == "task.started"
    assert started["data"]["version"] == 1
    assert started["data"]["task"]["status"] == "running"
    assert updated["data"]["task"]["outputs"] == details["Outputs"]
    assert ended["data"]["run"] == {
        "run": 1,
        "owner": "user-1",
        "started_at": started["data"]["task"]["started_at"],
        "ended_at": stopped["data"]["task"]["ended_at"],
        "ended": "stopped",
        "seconds": 30,
    }
    # The last body is the task as the API serves it.
    task = client.get("/api/tasks/task-1", headers=auth).json["task"]
    assert task["version"] == 4
    for name, value in stopped["data"]["task"].items():
        assert task[name] == value, name


def test_a_failure_emits_run_ended_and_task_failed(
    app: Flask, client: FlaskClient, db: Session, receiver: Receiver
) -> None:
    subscribe(app, receiver)
    t = int(time.time()) - 60
    post(client, sequence=1, timestamp=t)
    post(client, "transcode_stop", sequence=2, stop_reason=1, timestamp=t + 10)
    assert types(db) == ["task.started", "run.ended", "task.failed"]
    assert events(db)[1][2]["data"]["run"]["ended"] == "failed"


def test_duplicates_and_stale_callbacks_emit_nothing(
    app: Flask, client: FlaskClient, db: Session, receiver: Receiver
) -> None:
    subscribe(app, receiver)
    t = int(time.time()) - 60
    start = callback(sequence=1, timestamp=t)
    client.post("/callbacks/zego", json=start)
    post(client, sequence=3, status="TranscodeUpdated", timestamp=t + 9)
    assert types(db) == ["task.started", "task.updated"]
    assert client.post("/callbacks/zego", json=start).json["verdict"] == "duplicate"
    resent = callback(sequence=1, timestamp=t)  # the same event with a new nonce
    assert client.post("/callbacks/zego", json=resent).json["verdict"] == "duplicate"
    stale = post(client, sequence=2, status="TranscodeUpdated", timestamp=t + 5)
    assert stale["verdict"] == "stale"
    assert types(db) == ["task.started", "task.updated"]
    db.rollback()
    assert db.execute(select(Task.version)).scalar_one() == 2


def test_a_late_start_revises_a_history_already_passed_on(
    app: Flask, client: FlaskClient, db: Session, receiver: Receiver
) -> None:
    """The stop came first: its run's start was unknown. The start, arriving late, gives
    the ended run its start time: that is a revision of what was told."""
    subscribe(app, receiver)
    t = int(time.time()) - 60
    post(client, "transcode_stop", sequence=2, timestamp=t + 20)
    assert types(db) == ["run.ended", "task.stopped"]
    assert events(db)[0][2]["data"]["run"]["started_at"] is None
    post(client, sequence=1, timestamp=t)
    assert types(db) == ["run.ended", "task.stopped", "task.revised"]
    revised = events(db)[-1][2]["data"]
    assert revised["version"] == 3
    assert revised["task"]["status"] == "stopped"
    assert revised["task"]["started_at"] is not None


def test_an_accepted_stop_request_emits_task_stopping(
    app: Flask, client: FlaskClient, db: Session, receiver: Receiver
) -> None:
    subscribe(app, receiver)
    t = int(time.time()) - 60
    post(client, sequence=1, timestamp=t)
    accept_stop(app, "task-1", "user-1", Step("request", 2, 10), t)
    assert types(db) == ["task.started", "task.stopping"]
    assert events(db)[-1][2]["data"]["task"]["status"] == "stopping"


def test_subscriptions_take_only_their_types_and_owner(
    app: Flask, client: FlaskClient, db: Session, receiver: Receiver
) -> None:
    everything = subscribe(app, receiver)
    stops = subscribe(app, receiver, event_types=["task.stopped", "task.failed"])
    theirs = subscribe(app, receiver, owner="user-2")
    off = subscribe(app, receiver)
    with Session(app.extensions["manager.engine"]) as session:
        disable_subscription(session, off.id, reason="test", now=utcnow())
        session.commit()
    t = int(time.time()) - 60
    post(client, task_id="a", user_id="user-1", sequence=1, timestamp=t)
    post(client, "transcode_stop", task_id="a", sequence=2, timestamp=t + 9)
    post(client, task_id="b", user_id="user-2", sequence=1, timestamp=t)
    db.rollback()
    sends = db.execute(
        select(EventSend.subscription_id, Task.task_id, Event.type)
        .join(Event, Event.id == EventSend.event_id)
        .join(Task, Task.id == Event.task_pk)
        .order_by(EventSend.id)
    ).all()
    by_sub: dict[int, list[tuple[str, str]]] = {}
    for sub_id, task_id, kind in sends:
        by_sub.setdefault(sub_id, []).append((task_id, kind))
    assert by_sub[everything.id] == [
        ("a", "task.started"),
        ("a", "run.ended"),
        ("a", "task.stopped"),
        ("b", "task.started"),
    ]
    assert by_sub[stops.id] == [("a", "task.stopped")]
    assert by_sub[theirs.id] == [("b", "task.started")]
    assert off.id not in by_sub


def test_without_subscriptions_nothing_is_stored_but_versions_grow(
    client: FlaskClient, db: Session
) -> None:
    t = int(time.time()) - 60
    post(client, sequence=1, timestamp=t)
    post(client, "transcode_stop", sequence=2, timestamp=t + 9)
    db.rollback()
    assert db.execute(select(Event)).first() is None
    assert db.execute(select(Task.version)).scalar_one() == 3


def test_a_stale_update_with_the_newest_details_passes_them_on(
    app: Flask, client: FlaskClient, db: Session, receiver: Receiver, auth: dict[str, str]
) -> None:
    """The stop came before the update: stale for the task's state, but its outputs are
    the newest the task has; the last event must carry them, as the API does."""
    subscribe(app, receiver)
    t = int(time.time()) - 60
    post(client, sequence=1, timestamp=t)
    post(client, "transcode_stop", sequence=3, timestamp=t + 30)
    newer = {"Input": {"StreamId": "in"}, "Outputs": [{"StreamId": "o2", "Width": 640}]}
    late = post(client, sequence=2, status="TranscodeUpdated", timestamp=t + 5, details=newer)
    assert late["verdict"] == "stale"
    assert types(db) == ["task.started", "run.ended", "task.stopped", "task.updated"]
    last = events(db)[-1][2]["data"]
    assert last["task"]["outputs"] == newer["Outputs"]
    assert last["task"]["status"] == "stopped"
    served = client.get("/api/tasks/task-1", headers=auth).json["task"]
    assert served["outputs"] == newer["Outputs"]
    assert served["version"] == last["version"] == 4
