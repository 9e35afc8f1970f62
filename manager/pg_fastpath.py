"""PostgreSQL: apply a callback in one autocommit statement when nothing else interferes.

The locked path (lifecycle.apply_callback) takes BEGIN, two statements and COMMIT,
each a round trip. Here the rules run on a state read without a lock, and a single
data-modifying statement writes the outcome only if that state is still the task's:

- a task seen for the first time (tried straight away for a TranscodeStarted, the
  usual first callback of a task): the statement inserts the task with its state
  after this delivery, and backs out whole if the task exists after all, or its
  nonce or event key is taken;
- an existing task: the statement locks the row only if its `xmin` (the
  transaction that wrote this row version) is the one read, so a delivery applied
  in between makes it write nothing.

When the statement writes nothing, `try_apply` returns None and the caller runs the
locked path, which sorts out every case the fast path leaves to it: a retransmitted
or reused nonce, a task that changed meanwhile. Locks are taken in the locked path's
order, task then nonce then event key, so the two paths cannot deadlock each other.
Being single statements in autocommit mode, the writes are atomic, and committed
before the function returns.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

from psycopg.errors import NotNullViolation
from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from .lifecycle import (
    DELIVERY_COLUMNS,
    NEW_TASK,
    STATE_FIELDS,
    WRITE_BACK_CTES,
    WRITTEN,
    Outcome,
    TaskState,
    apply_to_task,
    claim_nonce_cte,
    pg_json,
    run_of,
    run_values,
    task_values,
)
from .models import Delivery
from .sqlutil import driver_execute
from .zego.callbacks import STATUS_STARTED, Callback


def try_apply(
    conn: Connection,
    cb: Callback,
    *,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
) -> Outcome | None:
    """Record and apply the delivery in one statement, or return None having written nothing.

    `conn` is a PostgreSQL connection in autocommit mode (the app's autocommit engine).
    """
    delivery = {
        **cb.audit_fields(),
        "received_at": received_at,
        "remote_addr": remote_addr,
        "body_size": body_size,
        "raw_body": raw_body,
        "event_key": cb.event_key(),
    }
    claim = {"body_sha256": cb.body_digest(), "seen_at": received_at}
    # A TranscodeStarted is usually its task's first callback: create the task at once.
    first_start = cb.status == STATUS_STARTED and not cb.is_stop
    if first_start:
        outcome = _create(conn, cb, delivery, claim)
        if outcome is not None:
            return outcome
    row = driver_execute(conn, _PG_READ, {"app_id": cb.app_id, "task_id": cb.task_id})
    if row is None:
        # A start's create wrote nothing with no task there: its nonce or key was taken.
        return None if first_start else _create(conn, cb, delivery, claim)
    xmin, *state = row
    return _apply_to_existing(conn, cb, TaskState(*state), xmin, delivery, claim)


def _create(
    conn: Connection, cb: Callback, delivery: dict[str, Any], claim: dict[str, Any]
) -> Outcome | None:
    received_at = delivery["received_at"]
    verdict, reason, values = _applied(replace(_FRESH, updated_at=received_at), cb, delivery)
    values.update(claim, first_seen_at=received_at)
    try:
        task_pk, delivery_id = driver_execute(conn, _PG_CREATE, values)
    except IntegrityError as exc:
        if _is_undo(exc):
            return None  # the nonce or the event key was taken: nothing was written
        raise
    if task_pk is None:
        return None  # the task exists
    return Outcome(verdict, reason, task_pk, delivery_id)


def _apply_to_existing(
    conn: Connection,
    cb: Callback,
    task: TaskState,
    xmin: str,
    delivery: dict[str, Any],
    claim: dict[str, Any],
) -> Outcome | None:
    verdict, reason, values = _applied(task, cb, delivery)
    values.update(claim, xmin=xmin)
    delivery_id, duplicate_id = driver_execute(conn, _PG_WRITE_IF_UNCHANGED, values)
    if delivery_id is not None:
        return Outcome(verdict, reason, task.id, delivery_id)
    if duplicate_id is not None:
        # Another delivery holds the event key: this one is a resend, with a new nonce.
        return Outcome("duplicate", "same_event", task.id, duplicate_id)
    return None  # the task changed since it was read, or the nonce was seen


def _applied(
    task: TaskState, cb: Callback, delivery: dict[str, Any]
) -> tuple[str, str | None, dict[str, Any]]:
    """The rules applied to `task`: the verdict, and the statement's values."""
    before = run_of(task)
    verdict, reason = apply_to_task(task, cb, delivery["received_at"])
    values = {
        **delivery,
        **task_values(task),
        **run_values(task, before),
        "verdict": verdict,
        "reason": reason,
        "input": pg_json(task.input),
        "outputs": pg_json(task.outputs),
    }
    return verdict, reason, values


def _is_undo(exc: IntegrityError) -> bool:
    """Whether the error is _PG_CREATE's `undo`: a run without a task."""
    orig = exc.orig
    return (
        isinstance(orig, NotNullViolation)
        and orig.diag.table_name == "task_runs"
        and orig.diag.column_name == "task_pk"
    )


# --- statements, built once ---------------------------------------------------------

_DELIVERIES = cast(Table, Delivery.__table__)
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _typed(name: str) -> str:
    """A placeholder cast to its deliveries column's type: in a SELECT list, unlike in
    VALUES, PostgreSQL cannot infer a parameter's type from the column it goes to."""
    # Without a length: a cast to VARCHAR(n) would cut a longer text short, silently.
    sql_type = re.sub(r"\(\d+\)", "", _DELIVERIES.c[name].type.compile(dialect=_PG))
    return f"%({name})s::{sql_type}"


# The read: the task's state and the transaction that wrote this version of it.
_PG_READ = f"""
    SELECT xmin::text, {", ".join(STATE_FIELDS)} FROM tasks
    WHERE app_id = %(app_id)s AND task_id = %(task_id)s
"""  # noqa: S608 - column names from the model, values bound

_RECORDED = tuple(c for c in DELIVERY_COLUMNS if c != "task_pk")
_DELIVERY_VALUES = ", ".join(_typed(c) for c in _RECORDED)
# A resend under a new nonce: recorded without the key another delivery holds.
_DUPLICATE_VALUES = ", ".join(
    {"event_key": "NULL", "verdict": "'duplicate'", "reason": "'same_event'"}.get(c, _typed(c))
    for c in _RECORDED
)
_RUN_VALUES = """%(run_number)s::integer, %(run_owner)s::varchar,
    %(run_started_at)s::timestamp, %(run_ended_at)s::timestamp, %(run_stop_reason)s::smallint"""
_RUN_COLUMNS = "task_pk, run_no, owner, started_at, ended_at, stop_reason"

# A new task, written with its state after this delivery. Each step takes the row of
# the one before, so nothing is written past a step that wrote nothing. The task
# existing (created, empty) writes nothing at all; a new task whose nonce or event
# key is taken must not stay, and `undo` then inserts a run with a NULL task_pk,
# whose NOT NULL failure undoes the whole statement (_is_undo tells it apart).
_PG_CREATE = f"""
    WITH created AS (
        INSERT INTO tasks (app_id, task_id, first_seen_at, {", ".join(WRITTEN)})
        VALUES (%(app_id)s, %(task_id)s, %(first_seen_at)s,
            {", ".join(f"%({name})s" for name in WRITTEN)})
        ON CONFLICT (app_id, task_id) DO NOTHING
        RETURNING id
    ), {claim_nonce_cte("created")}, d AS (
        INSERT INTO deliveries (task_pk, {", ".join(_RECORDED)})
        SELECT created.id, {_DELIVERY_VALUES} FROM created, n
        ON CONFLICT (event_key) DO NOTHING
        RETURNING id
    ), run AS (
        INSERT INTO task_runs ({_RUN_COLUMNS})
        SELECT created.id, {_RUN_VALUES} FROM created, d
        WHERE %(run_changed)s::boolean
    ), undo AS (
        INSERT INTO task_runs (task_pk, run_no)
        SELECT NULL, NULL FROM created WHERE NOT EXISTS (SELECT FROM d)
    )
    SELECT (SELECT id FROM created), (SELECT id FROM d)
"""  # noqa: S608 - column names from the model, values bound

# An existing task: `t` locks the row only while its version is the one read (a
# concurrent writer's commit re-checks the condition against the new version, which
# fails), and every write below hangs off it. The delivery either takes its event
# key and writes the task and its run back, or, with the key taken, is recorded as a
# duplicate that only touches the task's last delivery time.
_PG_WRITE_IF_UNCHANGED = f"""
    WITH t AS (
        SELECT id FROM tasks WHERE id = %(task_pk)s AND xmin = %(xmin)s::xid FOR UPDATE
    ), {claim_nonce_cte("t")}, d AS (
        INSERT INTO deliveries (task_pk, {", ".join(_RECORDED)})
        SELECT %(task_pk)s::integer, {_DELIVERY_VALUES} FROM n
        ON CONFLICT (event_key) DO NOTHING
        RETURNING id
    ), {WRITE_BACK_CTES}, duplicate AS (
        INSERT INTO deliveries (task_pk, {", ".join(_RECORDED)})
        SELECT %(task_pk)s::integer, {_DUPLICATE_VALUES} FROM n
        WHERE NOT EXISTS (SELECT FROM d)
        RETURNING id
    ), touched AS (
        UPDATE tasks SET last_delivery_at = %(received_at)s
        WHERE id = %(task_pk)s AND EXISTS (SELECT FROM duplicate)
    )
    SELECT (SELECT id FROM d), (SELECT id FROM duplicate)
"""  # noqa: S608 - column names from the model, values bound

# The state of a task no delivery has touched; the rules always apply its first one.
_FRESH_FIELDS: dict[str, Any] = {
    **dict.fromkeys(STATE_FIELDS),
    **NEW_TASK,
    "id": 0,
    "updated_at": datetime.min,
}
_FRESH = TaskState(**_FRESH_FIELDS)
