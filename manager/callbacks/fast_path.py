"""PostgreSQL's fast path: most deliveries settled in autocommit, taking no lock.

`apply_optimistically` reads the task's row, the rules extend it, and one statement
writes it back only if it is still the version read (xmin), with the nonce and event
key claimed by plain INSERTs in the locked path's lock order (task, nonce, event key).
A new task's first TranscodeStarted is `create_task`'s one statement. Anything either
cannot settle writes nothing and returns None, for the locked path
(manager/callbacks/store.py's `apply_callback`) to take in a transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from manager.callbacks.deliveries import (
    Outcome,
    delivery_row,
    newer_details,
    nonce_claim,
    settle,
)
from manager.callbacks.history import (
    Change,
    TaskState,
    advance,
    event_of,
    extended,
    history_of,
)
from manager.callbacks.outbound import Emitted, pass_on
from manager.callbacks.pg_statements import (
    PG_CREATE_TASK,
    PG_GUARDED_WRITE,
    PG_READ_TASK,
    pg_values,
    variant,
)
from manager.callbacks.rules import NO_POSITION, TaskStatus, extend
from manager.sqlutil import driver_execute
from manager.vocabulary import Verdict
from manager.zego.callbacks import STATUS_STARTED, Callback

# A task, nonce or event key already there fails PG_GUARDED_WRITE and PG_CREATE_TASK
# (plain INSERTs) on its unique key.
UNIQUE_VIOLATION = "23505"


def apply_optimistically(
    conn: Connection,
    cb: Callback,
    *,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
) -> Outcome | None:
    """PostgreSQL, in autocommit: the common delivery in two statements and no
    transaction, or None, having written nothing, for apply_callback to take.

    A new task's first TranscodeStarted is create_task's one statement. Otherwise the
    task's row is read without a lock, the rules extend it (None if they must refold),
    and one statement writes it back only if the row is still the version read, claims
    the nonce and records the delivery (None if the task changed meanwhile, the nonce
    was seen or the event key is taken: the statement then writes nothing).
    """
    if not cb.is_stop and cb.status == STATUS_STARTED:
        created = create_task(
            conn,
            cb,
            raw_body=raw_body,
            body_size=body_size,
            received_at=received_at,
            remote_addr=remote_addr,
        )
        if created is not None:
            return created
    row = driver_execute(conn, PG_READ_TASK, {"app_id": cb.app_id, "task_id": cb.task_id})
    if row is None:
        return None
    *state, version = row
    task = TaskState(*state)
    event = event_of(cb)
    before = history_of(task)
    after = extend(before, event)
    if after is None:
        return None
    change = extended(before, after)
    verdict, reason, details = settle(task, cb, change, received_at)
    emitted = pass_on(task, change, at=received_at, details=details)
    delivery = delivery_row(
        cb, task.id, raw_body, body_size, received_at, remote_addr, verdict, reason
    )
    delivery["event_key"] = cb.event_key()
    values = pg_values(task, change, delivery, details, emitted)
    values.update(nonce_claim(cb, received_at, cb.body_digest()), row_version=version)
    written = _write_if_unchanged(conn, change, emitted, values)
    if written is None:
        return None
    return Outcome(verdict, reason, task.id, written[0], refolded=False)


def _write_if_unchanged(
    conn: Connection, change: Change, emitted: list[Emitted], values: dict[str, Any]
) -> Any:
    """PG_GUARDED_WRITE's row (the delivery's id), or None, having written nothing."""
    try:
        return driver_execute(conn, PG_GUARDED_WRITE[variant(change, emitted)], values)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION:
            return None
        raise


def create_task(
    conn: Connection,
    cb: Callback,
    *,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
) -> Outcome | None:
    """PostgreSQL, in autocommit: the TranscodeStarted of a task not seen yet, in one
    statement and one round trip, the task written once, as the fold of this one event
    makes it. None, having written nothing, when the task exists, the nonce was seen or
    the event key is taken (the statement then fails on that unique key and undoes
    itself): apply_callback, in a transaction, takes those. It takes the locks in
    apply_callback's order: task, nonce, event key.
    """
    if cb.is_stop or cb.status != STATUS_STARTED:
        raise ValueError("only a TranscodeStarted can create a task here")
    task = _new_task(cb, received_at)
    change = advance(conn, task, event_of(cb), stored=False)  # extends: reads nothing
    details = newer_details(task, cb)
    emitted = pass_on(task, change, at=received_at, details=details)
    delivery = delivery_row(
        cb, 0, raw_body, body_size, received_at, remote_addr, Verdict.APPLIED, None
    )
    delivery["event_key"] = cb.event_key()
    # task_pk: the new row's id, in SQL
    values = pg_values(task, change, delivery, details, emitted)
    values.update(
        nonce_claim(cb, received_at, cb.body_digest()),
        app_id=cb.app_id,
        task_id=cb.task_id,
        first_seen_at=received_at,
    )
    try:
        task_pk, delivery_id = driver_execute(conn, PG_CREATE_TASK, values)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION:
            return None
        raise
    return Outcome(Verdict.APPLIED, None, task_pk, delivery_id, refolded=False)


def _new_task(cb: Callback, received_at: datetime) -> TaskState:
    """The row of a task not seen yet, before its first TranscodeStarted."""
    return TaskState(
        id=0,
        status=TaskStatus.RUNNING,
        stop_reason=None,
        state_seq=NO_POSITION[0],
        state_rank=NO_POSITION[1],
        max_seq=cb.sequence,
        owner_seq=None,
        owner_rank=None,
        owner=None,
        details_seq=None,
        details_rank=None,
        runs=0,
        last_failure_at=None,
        run_start_seen=False,
        started_at=None,
        ended_at=None,
        updated_at=received_at,
        last_delivery_at=received_at,
        app_id=cb.app_id,
        task_id=cb.task_id,
        input=None,
        outputs=None,
        version=0,
    )
