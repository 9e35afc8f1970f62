"""Task state rules of SPEC 3.2, through the webhook."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.models import Delivery, Task, TaskRun

from ..conftest import callback

T0 = 0  # set before each test: within CALLBACK_MAX_AGE however long the suite has run


@pytest.fixture(autouse=True)
def _recent_t0() -> None:
    global T0
    T0 = int(time.time()) - 200


def deliver(client: FlaskClient, event: str = "transcode_start", **kw: Any) -> str:
    response = client.post(
        "/callbacks/zego", data=json.dumps(callback(event, **kw)), content_type="application/json"
    )
    assert response.status_code == 200, response.json
    verdict: str = response.json["verdict"]
    return verdict


def task(db: Session, task_id: str = "task-1") -> Task:
    db.rollback()  # end the read snapshot so the latest commits are visible
    return db.execute(select(Task).where(Task.task_id == task_id)).scalar_one()


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def test_start_update_stop(client: FlaskClient, db: Session) -> None:
    assert deliver(client, sequence=1, timestamp=T0) == "applied"
    t = task(db)
    assert (t.status, t.started_at, t.ended_at) == ("running", at(T0), None)
    updated = {"Input": {"StreamId": "in"}, "Outputs": [{"StreamId": "o", "Width": 640}]}
    assert (
        deliver(client, sequence=2, status="TranscodeUpdated", details=updated, timestamp=T0 + 5)
        == "applied"
    )
    t = task(db)
    assert (t.status, t.outputs, t.started_at) == ("running", updated["Outputs"], at(T0))
    assert deliver(client, "transcode_stop", sequence=3, timestamp=T0 + 60) == "applied"
    t = task(db)
    assert (t.status, t.stop_reason, t.ended_at, t.max_seq) == ("stopped", 0, at(T0 + 60), 3)
    assert t.owner == "user-1"


def test_stop_reason_one_is_failed(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=1, timestamp=T0)
    assert (
        deliver(client, "transcode_stop", sequence=2, stop_reason=1, timestamp=T0 + 9) == "applied"
    )
    assert (task(db).status, task(db).stop_reason) == ("failed", 1)


def test_each_delivery_keeps_the_callbacks_own_status(client: FlaskClient, db: Session) -> None:
    """The audit columns are the callback's, not the task's state after it."""
    deliver(client, sequence=1, timestamp=T0)
    deliver(client, "transcode_stop", sequence=2, stop_reason=1, timestamp=T0 + 9)
    deliver(client, sequence=1, status="TranscodeUpdated", timestamp=T0 + 5)  # stale
    db.rollback()
    rows = db.execute(
        select(Delivery.event, Delivery.verdict, Delivery.status, Delivery.stop_reason).order_by(
            Delivery.id
        )
    ).all()
    assert [tuple(row) for row in rows] == [
        ("transcode_start", "applied", "TranscodeStarted", None),
        ("transcode_stop", "applied", "TranscodeStopped", 1),
        ("transcode_start", "stale", "TranscodeUpdated", None),
    ]


def test_lower_sequence_changes_none_of_the_tasks_state(client: FlaskClient, db: Session) -> None:
    """An update below the start cannot take the task over: the state is the newest
    start's. (It belonged to an earlier run, which it proves: see tests/callbacks.)"""
    deliver(client, sequence=5, user_id="owner", timestamp=T0)
    before = task(db)
    snapshot = (before.status, before.owner, before.input, before.started_at, before.state_seq)
    stale_details = {"Input": {"StreamId": "old"}}
    deliver(
        client,
        sequence=4,
        status="TranscodeUpdated",
        user_id="intruder",
        details=stale_details,
        timestamp=T0 - 10,
    )
    after = task(db)
    assert (after.status, after.owner, after.input, after.started_at, after.state_seq) == snapshot


def test_a_late_update_inside_the_run_is_stale(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=1, user_id="owner", timestamp=T0)
    deliver(client, sequence=3, status="TranscodeUpdated", user_id="owner", timestamp=T0 + 9)
    before = task(db)
    assert deliver(client, sequence=2, status="TranscodeUpdated", timestamp=T0 + 5) == "stale"
    db.rollback()
    assert db.execute(select(Delivery.verdict).order_by(Delivery.id.desc())).first() == ("stale",)
    assert (task(db).status, task(db).state_seq, task(db).runs) == (
        before.status,
        before.state_seq,
        before.runs,
    )


def test_late_start_after_stop_does_not_reopen(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=1, timestamp=T0)
    deliver(client, "transcode_stop", sequence=3, timestamp=T0 + 30)
    assert deliver(client, sequence=2, status="TranscodeUpdated", timestamp=T0 + 10) == "stale"
    assert task(db).status == "stopped"


def test_start_after_stop_begins_a_new_run(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=1, timestamp=T0)
    deliver(client, "transcode_stop", sequence=2, timestamp=T0 + 10)
    assert deliver(client, sequence=3, timestamp=T0 + 20) == "applied"
    t = task(db)
    assert (t.status, t.runs, t.started_at, t.ended_at, t.stop_reason) == (
        "running",
        2,
        at(T0 + 20),
        None,
        None,
    )


def test_stop_with_started_status_still_stops(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=1, timestamp=T0)
    # zego-reference.md: the documented stop example carries Status TranscodeStarted.
    assert deliver(client, "transcode_stop", sequence=2, status="TranscodeStarted") == "applied"
    assert task(db).status == "stopped"


def test_automatic_stop_with_low_sequence_ends_run_by_timestamp(
    client: FlaskClient, db: Session
) -> None:
    deliver(client, sequence=5, timestamp=T0)
    deliver(client, sequence=6, status="TranscodeUpdated", timestamp=T0 + 5)
    # ZEGO's own stop: Sequence undocumented (here 0), Timestamp after the run's start.
    assert (
        deliver(client, "transcode_stop", sequence=0, stop_reason=1, timestamp=T0 + 50) == "applied"
    )
    t = task(db)
    assert (t.status, t.ended_at) == ("failed", at(T0 + 50))


def test_automatic_stop_older_than_the_run_proves_an_earlier_run(
    client: FlaskClient, db: Session
) -> None:
    deliver(client, sequence=5, timestamp=T0 + 100)
    assert (
        deliver(client, "transcode_stop", sequence=0, stop_reason=1, timestamp=T0 + 50) == "applied"
    )
    assert task(db).status == "running"
    assert runs(db) == [
        (1, "user-1", None, at(T0 + 50), 1),
        (2, "user-1", at(T0 + 100), None, None),
    ]


def test_user_stop_with_low_sequence_leaves_the_task_running(
    client: FlaskClient, db: Session
) -> None:
    deliver(client, sequence=5, timestamp=T0)
    deliver(client, "transcode_stop", sequence=4, stop_reason=0, timestamp=T0 - 50)
    assert task(db).status == "running"
    assert runs(db) == [(1, "user-1", None, at(T0 - 50), 0), (2, "user-1", at(T0), None, None)]


def test_stop_at_least_run_start_sequence_ends_run(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=5, timestamp=T0)
    deliver(client, sequence=7, status="TranscodeUpdated", timestamp=T0 + 5)
    assert deliver(client, "transcode_stop", sequence=6, timestamp=T0 + 9) == "applied"
    t = task(db)
    assert t.status == "stopped"
    # A further update at 7 is now older than the stop that ended the run.
    assert (
        deliver(client, sequence=7, status="TranscodeUpdated", timestamp=T0 + 5, user_id="x")
        == "duplicate"
    )


def test_missing_sequence_counts_as_zero(client: FlaskClient, db: Session) -> None:
    assert deliver(client, sequence=None, timestamp=T0) == "applied"
    assert task(db).max_seq == 0
    assert deliver(client, "transcode_stop", sequence=None, timestamp=T0 + 3) == "applied"
    assert task(db).status == "stopped"


def test_run_times_are_zego_timestamps(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=1, timestamp=T0)
    deliver(client, "transcode_stop", sequence=2, timestamp=T0 + 42)
    t = task(db)
    assert (t.ended_at - t.started_at).total_seconds() == 42
    received = db.execute(select(Delivery.received_at)).scalars().all()
    assert all(r > at(T0 + 42) for r in received)


def test_owner_comes_from_starts_not_from_stops(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=1, user_id="owner-a")
    deliver(client, "transcode_stop", sequence=2, user_id="operator-b")
    assert task(db).owner == "owner-a"


def test_stop_before_start_then_late_start_fills_in_the_run(
    client: FlaskClient, db: Session
) -> None:
    assert deliver(client, "transcode_stop", sequence=3, timestamp=T0 + 30) == "applied"
    t = task(db)
    assert (t.status, t.owner, t.started_at) == ("stopped", None, None)
    assert deliver(client, sequence=1, user_id="late", timestamp=T0) == "applied"
    t = task(db)
    assert (t.status, t.owner, t.started_at, t.ended_at) == ("stopped", "late", at(T0), at(T0 + 30))


def test_tasks_are_independent(client: FlaskClient, db: Session) -> None:
    deliver(client, task_id="a", sequence=1)
    deliver(client, task_id="b", sequence=1)
    deliver(client, "transcode_stop", task_id="a", sequence=2)
    assert (task(db, "a").status, task(db, "b").status) == ("stopped", "running")


def runs(db: Session, task_id: str = "task-1") -> list[tuple[Any, ...]]:
    db.rollback()
    return [
        tuple(r)
        for r in db.execute(
            select(
                TaskRun.run_no,
                TaskRun.owner,
                TaskRun.started_at,
                TaskRun.ended_at,
                TaskRun.stop_reason,
            )
            .join(Task, Task.id == TaskRun.task_pk)
            .where(Task.task_id == task_id)
            .order_by(TaskRun.run_no)
        )
    ]


def test_every_run_is_kept_for_the_reports(client: FlaskClient, db: Session) -> None:
    t0 = int(time.time()) - 200
    deliver(client, sequence=1, user_id="u", timestamp=t0)
    assert runs(db) == [(1, "u", at(t0), None, None)]
    deliver(client, sequence=2, status="TranscodeUpdated", user_id="u", timestamp=t0 + 5)
    deliver(client, "transcode_stop", sequence=3, timestamp=t0 + 60)
    deliver(client, sequence=4, user_id="u", timestamp=t0 + 70)
    deliver(client, "transcode_stop", sequence=5, stop_reason=1, timestamp=t0 + 90)
    assert runs(db) == [
        (1, "u", at(t0), at(t0 + 60), 0),
        (2, "u", at(t0 + 70), at(t0 + 90), 1),
    ]


def test_a_run_whose_stop_came_first_gets_its_start_later(client: FlaskClient, db: Session) -> None:
    t0 = int(time.time()) - 200
    deliver(client, "transcode_stop", sequence=3, timestamp=t0 + 30)
    assert runs(db) == [(1, None, None, at(t0 + 30), 0)]
    deliver(client, sequence=1, user_id="late", timestamp=t0)
    assert runs(db) == [(1, "late", at(t0), at(t0 + 30), 0)]


def test_a_restart_without_a_stop_ends_the_earlier_run(client: FlaskClient, db: Session) -> None:
    t0 = int(time.time()) - 200
    deliver(client, sequence=1, user_id="u", timestamp=t0)
    deliver(client, sequence=5, user_id="u", timestamp=t0 + 40)  # a new TranscodeStarted
    assert runs(db) == [(1, "u", at(t0), at(t0 + 40), None), (2, "u", at(t0 + 40), None, None)]
    assert deliver(client, sequence=5, user_id="u", timestamp=t0 + 41) == "duplicate"
    assert len(runs(db)) == 2
