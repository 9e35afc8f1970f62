"""Record a verified callback and keep its task and runs what its events make them.

The rules live in manager/callbacks/rules.py; the modules beside them store what they
return, on every backend: the webhook's callbacks (fast_path.py's
`apply_optimistically` and `create_task`, then this module's `apply_callback`), our
own stop requests that ZEGOCLOUD accepted (accepted_stops.py) and `manager rebuild`
(rebuild.py, through history.py's `diff` and task_rows.py's `write_back`). history.py
is the glue between the rules and the rows, task_rows.py writes a task and its runs
back, deliveries.py records a delivery and claims its nonce, pg_statements.py holds
PostgreSQL's one-statement versions of those steps.

Most deliveries are newer than everything their task has seen; `rules.extend` applies
those to the task row alone. Any other (a late one, or a start no later than the
task's latest StopReason 1 stop) refolds the task's whole history: its recorded
events are read back and `rules.fold` recomputes the task and every run.

Concurrency: the nonce ledger and the duplicate key are unique constraints claimed
with INSERT … ON CONFLICT DO NOTHING, and the task row is locked (created by INSERT …
ON CONFLICT DO NOTHING, or else locked by SELECT … FOR UPDATE, on PostgreSQL; SQLite
transactions start with BEGIN IMMEDIATE) before the rules read it. Locks are always
taken in the order task, nonce, event key, so concurrent deliveries cannot deadlock,
and the result is that of some serial order, which the fold makes the same for all.

On PostgreSQL most deliveries take no lock: `apply_optimistically` reads the row,
and one statement writes it back only if it is still the version read (xmin), with
the nonce and event key claimed by plain INSERTs in the same lock order; anything
it cannot settle writes nothing and goes through `apply_callback`'s transaction.

This is the hot path of the service, so it runs statements built once, at import, on
the caller's connection: in the transaction, on PostgreSQL, one statement creates or
locks the task and claims the nonce, and one records the delivery and, only if its
event key was free, writes the task and its changed runs back; SQLite takes a few
more statements.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import JSON, Connection, DateTime, Table, bindparam, update
from sqlalchemy.dialects import sqlite

from manager.callbacks.deliveries import (
    CLAIM_NONCE,
    INSERT_DELIVERY_IGNORE,
    Details,
    Outcome,
    another_failure,
    check_retransmission,
    delivery_row,
    nonce_claim,
    record_duplicate,
    settle,
)
from manager.callbacks.history import (
    STATE_FIELDS,
    Change,
    TaskState,
    advance,
    event_of,
)
from manager.callbacks.outbound import Emitted, pass_on
from manager.callbacks.pg_statements import (
    PG_CLAIM_AND_LOCK,
    PG_LOCK_AND_CLAIM,
    PG_RECORD_AND_WRITE_BACK,
    pg_values,
    variant,
)
from manager.callbacks.task_rows import NEW_TASK, write_back
from manager.models import Task
from manager.sqlutil import driver_execute, driver_send
from manager.vocabulary import Verdict
from manager.zego.callbacks import Callback

# The outcome once the delivery is recorded: (its id, None), or (None, the id of the
# duplicate it was recorded as).
Reader = Callable[[int | None, int | None], Outcome]


def apply_callback(
    conn: Connection,
    cb: Callback,
    *,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
) -> Callable[[], Outcome]:
    """Record one verified delivery and move its task as its events now say. Never commits.

    `conn` is in a write transaction that the caller commits (db.write_then_read);
    the returned reader gives the outcome once it has. On PostgreSQL the last
    statement's answer (was the event key free?) is read only then, so that it
    travels with the COMMIT.
    """
    postgres = conn.dialect.name == "postgresql"
    digest = cb.body_digest()
    row, nonce_claimed = _lock_task_and_claim_nonce(conn, cb, digest, received_at, postgres)
    if not nonce_claimed:
        check_retransmission(conn, cb, digest)
    task = TaskState(*row)

    delivery = delivery_row(
        cb, task.id, raw_body, body_size, received_at, remote_addr, Verdict.DUPLICATE, "same_nonce"
    )
    if not nonce_claimed:
        return record_duplicate(conn, task, delivery)

    # The rules first: the verdict goes into the same INSERT that claims the event key.
    event = event_of(cb)
    change = advance(conn, task, event, stored=False)
    verdict, reason, details = settle(task, cb, change, received_at)
    emitted = pass_on(task, change, at=received_at, details=details)
    key = cb.event_key()
    # Only a refold can meet a failure of the same key (see another_failure).
    if change.full and event.is_failure and another_failure(conn, task.id, cb):
        key = cb.event_key(at_timestamp=True)
    delivery.update(event_key=key, verdict=verdict, reason=reason)

    def outcome(delivery_id: int | None, duplicate_id: int | None) -> Outcome:
        if delivery_id is not None:
            return Outcome(verdict, reason, task.id, delivery_id, refolded=change.full)
        # Another delivery holds the event key: this one is a resend, with a new nonce.
        assert duplicate_id is not None  # noqa: S101 - the statement writes one or the other
        return Outcome(Verdict.DUPLICATE, "same_event", task.id, duplicate_id)

    if postgres:
        return _record_and_write_back_pg(conn, task, change, emitted, delivery, details, outcome)
    return _record_and_write_back(conn, task, change, emitted, delivery, details, outcome)


def _lock_task_and_claim_nonce(
    conn: Connection, cb: Callback, digest: str, received_at: datetime, postgres: bool
) -> tuple[list[Any], bool]:
    """The task's row, created or locked, and whether the nonce was free (now claimed)."""
    claim = {
        **nonce_claim(cb, received_at, digest),
        "app_id": cb.app_id,
        "task_id": cb.task_id,
        "now": received_at,
    }
    if postgres:
        *row, claimed = driver_execute(conn, PG_CLAIM_AND_LOCK, claim)
        if row[0] is None:  # created by another transaction meanwhile (see the statement)
            *row, claimed = driver_execute(conn, PG_LOCK_AND_CLAIM, claim)
        nonce_claimed = bool(claimed)
    else:
        nonce_claimed = conn.execute(CLAIM_NONCE, claim).first() is not None
        row = list(conn.execute(_UPSERT_TASK, claim).one())
    return row, nonce_claimed


def _record_and_write_back_pg(
    conn: Connection,
    task: TaskState,
    change: Change,
    emitted: list[Emitted],
    delivery: dict[str, Any],
    details: Details | None,
    outcome: Reader,
) -> Callable[[], Outcome]:
    """One statement, sent now and answered with the COMMIT (see PG_RECORD_AND_WRITE_BACK)."""
    values = pg_values(task, change, delivery, details, emitted)
    statement = PG_RECORD_AND_WRITE_BACK[variant(change, emitted)]
    cursor = driver_send(conn, statement, values)
    return lambda: outcome(*cursor.fetchone())


def _record_and_write_back(
    conn: Connection,
    task: TaskState,
    change: Change,
    emitted: list[Emitted],
    delivery: dict[str, Any],
    details: Details | None,
    outcome: Reader,
) -> Callable[[], Outcome]:
    """SQLite (any backend): the delivery under its event key and, only if the key was
    free, the task and its runs written back; else the delivery is a duplicate."""
    delivery_id = conn.execute(INSERT_DELIVERY_IGNORE, delivery).scalar()
    if delivery_id is not None:
        write_back(conn, task, change, emitted)
        if details is not None:
            conn.execute(
                _WRITE_DETAILS, {"task_pk": task.id, "input": details[0], "outputs": details[1]}
            )
        return lambda: outcome(delivery_id, None)
    delivery.update(event_key=None, verdict=Verdict.DUPLICATE, reason="same_event")
    return record_duplicate(conn, task, delivery)


# --- statements, built once (SQLite and any other backend) --------------------------

_TASKS = cast(Table, Task.__table__)
# SQL NULL, not JSON null, where a task has no input or outputs.
_JSON = JSON(none_as_null=True)
_TYPED = (bindparam("input", type_=_JSON), bindparam("outputs", type_=_JSON))

_UPSERT_TASK = (
    sqlite.insert(_TASKS)
    .values(
        app_id=bindparam("app_id"),
        task_id=bindparam("task_id"),
        first_seen_at=bindparam("now", type_=DateTime()),
        updated_at=bindparam("now", type_=DateTime()),
        **NEW_TASK,
    )
    .on_conflict_do_update(
        index_elements=[_TASKS.c.app_id, _TASKS.c.task_id],
        set_={"app_id": sqlite.insert(_TASKS).excluded.app_id},
    )
    .returning(*(_TASKS.c[name] for name in STATE_FIELDS))
)
_WRITE_DETAILS = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("task_pk"))
    .values(input=_TYPED[0], outputs=_TYPED[1])
)
