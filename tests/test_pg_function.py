"""manager_apply_callback() (PostgreSQL, migration 0011) against the Python rules.

- One delivery to a task in any state the columns allow: the function and
  lifecycle.apply_to_task give the same verdict and the same row.
- The same deliveries to two tasks, one through the locked path and one through the
  function: any sequence of them, with resends, stale and reordered events, gives both
  tasks the same verdicts, the same state and the same runs.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from manager.db import write_connection
from manager.lifecycle import (
    STATE_FIELDS,
    Outcome,
    TaskState,
    apply_callback,
    apply_to_task,
    utc_from_timestamp,
)
from manager.models import Delivery, Task, TaskRun
from manager.pg_fastpath import try_apply
from manager.zego.callbacks import parse_callback

from .conftest import APP_ID, callback

pytestmark = pytest.mark.postgres

BASE_TIME = 1_760_000_000
RECEIVED = datetime(2026, 1, 1)
DETAILS = (
    {"Input": {"StreamId": "in"}, "Outputs": [{"StreamId": "o", "Width": 1280}]},
    {"Input": {"StreamId": "in"}, "Outputs": [{"StreamId": "o", "Width": 640}]},
)
# Few values of each, so that events collide, resend and overtake one another.
starts = st.fixed_dictionaries(
    {
        "event": st.just("transcode_start"),
        "status": st.sampled_from(["TranscodeStarted", "TranscodeUpdated"]),
        "sequence": st.sampled_from([None, 0, 1, 2, 3, 4]),
        "timestamp": st.sampled_from([0, 5, 10, 30, 40]),
        "user_id": st.sampled_from(["u-a", "u-b"]),
        "details": st.sampled_from([*DETAILS, None]),  # None: no Details at all
    }
)
stops = st.fixed_dictionaries(
    {
        "event": st.just("transcode_stop"),
        # The documented stop example carries Status TranscodeStarted.
        "status": st.sampled_from(["TranscodeStopped", "TranscodeStarted"]),
        "sequence": st.sampled_from([None, 0, 1, 2, 3, 4]),
        "stop_reason": st.sampled_from([0, 1]),
        "timestamp": st.sampled_from([0, 5, 10, 30, 40]),
        "user_id": st.sampled_from(["u-a", "u-b"]),
    }
)
deliveries = st.lists(st.one_of(starts, stops), min_size=1, max_size=8)

SEQS = st.sampled_from([-1, 0, 1, 2, 3])
RANKS = st.sampled_from([0, 2, 4, 6])
TIMES = st.sampled_from([utc_from_timestamp(BASE_TIME + s) for s in (0, 5, 10, 30, 40)])
COLUMN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "status": st.sampled_from(["running", "stopping", "stopped", "failed"]),
    "stop_reason": st.sampled_from([None, 0, 1]),
    "state_seq": SEQS,
    "state_rank": RANKS,
    "max_seq": SEQS,
    "owner_seq": st.none() | SEQS,
    "owner_rank": st.none() | RANKS,
    "owner": st.sampled_from([None, "u-a", "u-b"]),
    "details_seq": st.none() | SEQS,
    "details_rank": st.none() | RANKS,
    "input": st.sampled_from([None, DETAILS[0]["Input"]]),
    "outputs": st.sampled_from([None, DETAILS[0]["Outputs"], DETAILS[1]["Outputs"]]),
    "runs": st.integers(0, 3),
    "run_floor_seq": SEQS,
    "run_start_seq": st.none() | SEQS,
    "run_start_rank": st.none() | RANKS,
    "end_seq": st.none() | SEQS,
    "started_at": st.none() | TIMES,
    "ended_at": st.none() | TIMES,
    "updated_at": st.just(RECEIVED - timedelta(days=1)),
    "last_delivery_at": st.none() | st.just(RECEIVED - timedelta(days=1)),
}
task_states = st.fixed_dictionaries(COLUMN_VALUES)

EMPTY_TASK: dict[str, Any] = {
    **dict.fromkeys(COLUMN_VALUES),
    "status": "running",
    "state_seq": -1,
    "state_rank": 0,
    "max_seq": -1,
    "runs": 0,
    "run_floor_seq": -1,
    "updated_at": RECEIVED - timedelta(days=1),
}

TASK_FIELDS = tuple(
    c.name for c in Task.__table__.columns if c.name not in ("id", "task_id", "app_id")
)
RUN_FIELDS = ("run_no", "owner", "started_at", "ended_at", "stop_reason")
# All but what names the task or the delivery itself (its task, its own nonce).
DELIVERY_FIELDS = tuple(
    c.name
    for c in Delivery.__table__.columns
    if c.name not in ("id", "task_pk", "task_id", "event_key", "nonce")
)


def body_of(spec: dict[str, Any], task_id: str) -> dict[str, object]:
    """The callback `spec` describes, for `task_id`."""
    kwargs = dict(spec, timestamp=BASE_TIME + spec["timestamp"], task_id=task_id)
    body = callback(kwargs.pop("event"), **kwargs)
    if "details" in spec and spec["details"] is None:
        del body["Details"]  # callback() gives every start some
    return body


def deliver(
    engine: Engine, autocommit: Engine | None, task_id: str, spec: dict[str, Any], at: datetime
) -> Outcome | None:
    """One delivery of `spec` to `task_id`: by the locked path, or by the function when
    `autocommit` (the app's autocommit engine) is given."""
    cb = parse_callback(body_of(spec, task_id))
    where = {"raw_body": b"{}", "body_size": 2, "received_at": at, "remote_addr": None}
    if autocommit is None:
        with write_connection(engine) as conn:
            return apply_callback(conn, cb, **where)
    with autocommit.connect() as conn:
        return try_apply(conn, cb, **where)


def outcome_of(outcome: Outcome | None) -> tuple[str, str | None]:
    assert outcome is not None, "the function left a fresh nonce to the locked path"
    return outcome.verdict, outcome.reason


def state(db: Session, task_id: str) -> tuple[Any, ...]:
    task = db.execute(select(Task).where(Task.task_id == task_id)).scalar_one()
    runs = db.execute(
        select(*(TaskRun.__table__.c[name] for name in RUN_FIELDS))
        .where(TaskRun.task_pk == task.id)
        .order_by(TaskRun.run_no)
    ).all()
    verdicts = db.execute(
        select(*(Delivery.__table__.c[name] for name in DELIVERY_FIELDS))
        .where(Delivery.task_pk == task.id)
        .order_by(Delivery.id)
    ).all()
    db.rollback()
    return tuple(getattr(task, name) for name in TASK_FIELDS), runs, verdicts


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(columns=task_states, spec=st.one_of(starts, stops))
# An update at the very position its run began from: the run keeps its start time.
@example(
    columns=dict(
        EMPTY_TASK,
        state_seq=3,
        state_rank=4,
        max_seq=3,
        runs=1,
        run_start_seq=2,
        run_start_rank=4,
        started_at=utc_from_timestamp(BASE_TIME),
    ),
    spec={
        "event": "transcode_start",
        "status": "TranscodeUpdated",
        "sequence": 2,
        "timestamp": 10,
        "user_id": "u-a",
        "details": DETAILS[0],
    },
)
def test_one_delivery_to_any_state_gives_the_python_result(
    app: Flask, db: Session, columns: dict[str, Any], spec: dict[str, Any]
) -> None:
    autocommit = app.extensions["manager.autocommit_engine"]
    task_id = f"any-{uuid.uuid4().hex}"
    row = Task(app_id=APP_ID, task_id=task_id, first_seen_at=RECEIVED, **columns)
    db.add(row)
    db.commit()
    expected = TaskState(id=row.id, **columns)
    cb = parse_callback(body_of(spec, task_id))
    verdict = apply_to_task(expected, cb, RECEIVED)

    got = deliver(app.extensions["manager.engine"], autocommit, task_id, spec, RECEIVED)
    assert outcome_of(got) == verdict
    task = db.execute(select(Task).where(Task.task_id == task_id)).scalar_one()
    db.refresh(task)
    after = {name: getattr(task, name) for name in STATE_FIELDS}
    db.rollback()
    assert after == {name: getattr(expected, name) for name in STATE_FIELDS}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=deliveries)
def test_the_function_gives_what_the_python_rules_give(
    app: Flask, db: Session, specs: list[dict[str, Any]]
) -> None:
    engine = app.extensions["manager.engine"]
    autocommit = app.extensions["manager.autocommit_engine"]
    locked_task, function_task = f"py-{uuid.uuid4().hex}", f"fn-{uuid.uuid4().hex}"
    for step, spec in enumerate(specs):
        at = RECEIVED + timedelta(seconds=step)
        expected = outcome_of(deliver(engine, None, locked_task, spec, at))
        got = outcome_of(deliver(engine, autocommit, function_task, spec, at))
        assert got == expected, f"delivery {step}: {spec}"
        assert state(db, function_task) == state(db, locked_task), f"after delivery {step}"


def test_the_parity_test_sees_a_difference(app: Flask, db: Session) -> None:
    """The comparison itself: two tasks that did not get the same deliveries differ."""
    engine = app.extensions["manager.engine"]
    autocommit = app.extensions["manager.autocommit_engine"]
    start = {"event": "transcode_start", "status": "TranscodeStarted", "sequence": 1}
    start.update(timestamp=0, user_id="u-a", details=DETAILS[0])
    stop = {"event": "transcode_stop", "status": "TranscodeStopped", "sequence": 2}
    stop.update(stop_reason=1, timestamp=10, user_id="u-b")
    deliver(engine, None, "a", start, RECEIVED)
    deliver(engine, autocommit, "b", start, RECEIVED)
    assert state(db, "a") == state(db, "b")
    deliver(engine, autocommit, "b", stop, RECEIVED)
    assert state(db, "a") != state(db, "b")
