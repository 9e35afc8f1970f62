"""Through the webhook and the stop path, on SQLite and PostgreSQL: any arrival order
of a random lifecycle, with resends, gives the sorted order's task row, runs and
report figures."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from manager.callbacks.accepted_stops import apply_accepted_stops
from manager.callbacks.history import utc_from_timestamp
from manager.db import write_connection
from manager.models import StopAttempt, StopRequest, Task, TaskRun
from manager.reports import reporting
from manager.zego.signing import new_nonce, signed_callback

from ..conftest import APP_ID, CALLBACK_SECRET, callback
from .lifecycles import MAX_SPAN, Step, lifecycles

ROW = (
    "status",
    "stop_reason",
    "state_seq",
    "state_rank",
    "owner",
    "runs",
    "last_failure_at",
    "run_start_seen",
    "started_at",
    "ended_at",
)


def body(step: Step, task_id: str, owner: str, t0: int) -> dict[str, object]:
    if step.kind == "stop":
        return callback(
            "transcode_stop",
            task_id=task_id,
            user_id="operator",
            sequence=step.sequence,
            stop_reason=step.stop_reason,
            timestamp=t0 + step.offset,
        )
    # Outputs of their own for each start and update: only the newest may be the task's.
    outputs = [{"StreamId": f"out-{step.sequence}-{step.offset}", "Width": 1280}]
    return callback(
        task_id=task_id,
        user_id=owner,
        sequence=step.sequence,
        status="TranscodeStarted" if step.kind == "start" else "TranscodeUpdated",
        timestamp=t0 + step.offset,
        details={"Input": {"StreamId": f"in-{task_id}"}, "Outputs": outputs},
    )


def accept_stop(app: Flask, task_id: str, owner: str, step: Step, t0: int) -> None:
    """Our stop request, accepted by ZEGOCLOUD, recorded as the dispatcher records it."""
    at = utc_from_timestamp(t0 + step.offset)
    with write_connection(app.extensions["manager.engine"]) as conn:
        task_pk = conn.execute(select(Task.id).where(Task.task_id == task_id)).scalar_one()
        stop_id = conn.execute(
            insert(StopRequest)
            .values(
                task_pk=task_pk,
                state="succeeded",
                user_id=owner,
                sequence=step.sequence,
                requested_by="ops",
                force=False,
                created_at=at,
                attempts=1,
                next_attempt_at=at,
                completed_at=at,
            )
            .returning(StopRequest.id)
        ).scalar_one()
        conn.execute(
            insert(StopAttempt).values(
                stop_request_id=stop_id,
                attempted_at=at,
                sequence=step.sequence,
                outcome="success",
                elapsed_ms=1,
            )
        )
        apply_accepted_stops(conn, [(task_pk, step.sequence)], at)


def deliver(
    app: Flask, client: FlaskClient, steps: list[Step], order: list[int], owner: str, t0: int
) -> str:
    """Each step in `order` (an index twice is a resend); returns the task's id."""
    task_id = f"h-{uuid.uuid4().hex[:12]}"
    waiting: list[Step] = []  # stop requests before the task exists
    created = False
    for i in order:
        step = steps[i]
        if step.kind == "request":
            if created:
                accept_stop(app, task_id, owner, step, t0)
            else:
                waiting.append(step)
            continue
        response = client.post(
            "/callbacks/zego",
            data=json.dumps(body(step, task_id, owner, t0)),
            content_type="application/json",
        )
        assert response.status_code == 200, response.json
        created = True
        for request in waiting:
            accept_stop(app, task_id, owner, request, t0)
        waiting.clear()
    return task_id


def state(db: Session, task_id: str, now: datetime) -> tuple[Any, ...]:
    db.rollback()
    task = db.execute(select(Task).where(Task.task_id == task_id)).scalar_one()
    runs = db.execute(
        select(TaskRun.run_no, TaskRun.started_at, TaskRun.ended_at, TaskRun.stop_reason)
        .where(TaskRun.task_pk == task.id)
        .order_by(TaskRun.run_no)
    ).all()
    owner = task.owner
    window = reporting.Window(now - timedelta(days=2), now)
    summary = reporting.summary(db, window, owner=owner, now=now)
    owners = [
        (row.tasks, row.running, row.failed, row.transcoding_seconds)
        for row in reporting.owners(db, window, owner=owner, now=now)
    ]
    daily = [
        tuple(reporting.row_values(day))[1:] for day in reporting.daily(db, window, owner, now)
    ]
    return (
        tuple(getattr(task, f) for f in ROW),
        [tuple(r) for r in runs],
        {k: v for k, v in summary.items() if k not in ("deliveries", "stop_requests")},
        owners,
        daily,
    )


@settings(
    max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), steps=lifecycles())
def test_every_arrival_order_gives_the_sorted_state(
    app: Flask, client: FlaskClient, db: Session, data: st.DataObject, steps: list[Step]
) -> None:
    t0 = int(time.time()) - MAX_SPAN // 2
    now = utc_from_timestamp(t0 + MAX_SPAN + 60)
    by_position = sorted(
        range(len(steps)),
        key=lambda i: (
            steps[i].sequence,
            ["start", "update", "request", "stop"].index(steps[i].kind),
            steps[i].stop_reason or 0,
        ),
    )
    tag = uuid.uuid4().hex[:8]
    sorted_task = deliver(app, client, steps, by_position, f"sorted-{tag}", t0)
    resent = data.draw(st.lists(st.sampled_from(range(len(steps))), max_size=3))
    order = data.draw(st.permutations(list(range(len(steps))) + resent))
    # A stop request is ours: it is never resent.
    order = [i for n, i in enumerate(order) if steps[i].kind != "request" or i not in order[:n]]
    shuffled_task = deliver(app, client, steps, order, f"shuffled-{tag}", t0)

    expected, got = state(db, sorted_task, now), state(db, shuffled_task, now)
    assert got[0][:4] == expected[0][:4]
    assert got[0][5:] == expected[0][5:]  # the owner differs by design
    assert got[1:] == expected[1:]


def test_two_failures_with_sequence_zero_are_two_events_in_either_order(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    """ZEGOCLOUD's own stops share a key when both carry Sequence 0; more than a retry
    span apart they are two failures, and a resend within it is still a duplicate."""
    t0 = int(time.time()) - 200
    steps = [
        Step("start", 1, 0),
        Step("stop", 0, 20, stop_reason=1),
        Step("start", 2, 150),
        Step("stop", 0, 170, stop_reason=1),
    ]
    now = utc_from_timestamp(t0 + 400)
    first = deliver(app, client, steps, [0, 1, 2, 3], "owner-a", t0)
    second = deliver(app, client, steps, [3, 2, 1, 0], "owner-b", t0)
    for task_id in (first, second):
        row, runs, *_ = state(db, task_id, now)
        assert row[0] == "failed"
        assert [r[1:] for r in runs] == [
            (utc_from_timestamp(t0), utc_from_timestamp(t0 + 20), 1),
            (utc_from_timestamp(t0 + 150), utc_from_timestamp(t0 + 170), 1),
        ]
    resend = callback(
        "transcode_stop", task_id=second, sequence=0, stop_reason=1, timestamp=t0 + 170 + 30
    )
    answer = client.post(
        "/callbacks/zego", data=json.dumps(resend), content_type="application/json"
    )
    assert answer.json == {"code": 0, "verdict": "duplicate"}


def test_failures_without_a_status_are_told_apart_too(client: FlaskClient, db: Session) -> None:
    """A stop may come without Status (it is part of the event key, so it is NULL)."""
    t0 = int(time.time()) - 200

    def failure(at: int) -> dict[str, object]:
        payload = {
            "Event": "transcode_stop",
            "Appid": str(APP_ID),
            "TaskId": "no-status",
            "Sequence": 0,
            "StopReason": 1,
        }
        return signed_callback(CALLBACK_SECRET, payload, at, new_nonce())

    bodies = [
        callback(task_id="no-status", sequence=1, timestamp=t0),
        failure(t0 + 20),
        callback(task_id="no-status", sequence=2, timestamp=t0 + 150),
        failure(t0 + 170),
    ]
    verdicts = [
        client.post("/callbacks/zego", data=json.dumps(b), content_type="application/json").json[
            "verdict"
        ]
        for b in bodies
    ]
    assert verdicts == ["applied"] * 4
    row, runs, *_ = state(db, "no-status", utc_from_timestamp(t0 + 400))
    assert row[0] == "failed"
    assert [r[3] for r in runs] == [1, 1]
