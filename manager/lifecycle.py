"""The task state rules of SPEC 3.2: apply one verified callback to its task.

Concurrency: the nonce ledger and the duplicate key are unique constraints
claimed with INSERT … ON CONFLICT DO NOTHING, and the task row is locked (created
by INSERT … ON CONFLICT DO NOTHING, or else locked by SELECT … FOR UPDATE, on
PostgreSQL; SQLite transactions start with BEGIN IMMEDIATE) before the ordering
rules read it. Locks are always taken in the order task, nonce, event key, here
and on PostgreSQL's fast path (manager/pg_fastpath.py), so concurrent deliveries
cannot deadlock, and the result is the same as some serial order.

The rules (`apply_to_task`) run in Python on a `TaskState`, a plain copy of the
locked row, for every backend. PostgreSQL's fast path runs a copy of them in the
database, in manager_apply_callback() (migrations/versions/0011_*): a change to the
rules here needs the same change there, in a new migration, and
tests/test_pg_function.py fails until both agree.

Around the rules this is the hot path of the service, so it runs statements built
once, at import, on the caller's connection: on PostgreSQL one statement creates or
locks the task and claims the nonce, and one records the delivery and writes the
task back only if the delivery's event key was free; SQLite, which has no
data-modifying CTEs, takes a few more statements.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, cast

from psycopg.types.json import Json
from sqlalchemy import JSON, Connection, DateTime, Table, bindparam, insert, select, update
from sqlalchemy.dialects import sqlite

from .models import CallbackNonce, Delivery, Task, TaskRun
from .sqlutil import driver_execute
from .zego.callbacks import STATUS_STARTED, Callback, CallbackError

# Ranks are doubled so that our own stop request fits between update and stop (2.5).
RANK_STARTED = 2
RANK_UPDATED = 4
RANK_STOP_REQUEST = 5
RANK_STOPPED = 6

ACTIVE = ("running", "stopping")
ENDED = ("stopped", "failed")
NO_POSITION = -1  # below any Sequence: a missing Sequence counts as 0


@dataclass(frozen=True)
class Outcome:
    verdict: str
    reason: str | None
    task_pk: int
    delivery_id: int


@dataclass(slots=True)
class TaskState:
    """The columns of a locked `tasks` row that the rules read or write."""

    id: int
    status: str
    stop_reason: int | None
    state_seq: int
    state_rank: int
    max_seq: int
    owner_seq: int | None
    owner_rank: int | None
    owner: str | None
    details_seq: int | None
    details_rank: int | None
    input: Any | None
    outputs: Any | None
    runs: int
    run_floor_seq: int
    run_start_seq: int | None
    run_start_rank: int | None
    end_seq: int | None
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime
    last_delivery_at: datetime | None


def utc_from_timestamp(ts: int) -> datetime:
    """ZEGOCLOUD's Unix seconds as the naive UTC datetime stored everywhere."""
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def event_rank(cb: Callback) -> int:
    if cb.is_stop:
        return RANK_STOPPED
    return RANK_STARTED if cb.status == STATUS_STARTED else RANK_UPDATED


def apply_callback(
    conn: Connection,
    cb: Callback,
    *,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
) -> Outcome:
    """Record one verified delivery and move its task if it is the newest. Never commits.

    `conn` is in a write transaction (db.write_connection), which the caller commits.
    """
    postgres = conn.dialect.name == "postgresql"
    digest = cb.body_digest()
    claim = {
        "zego_timestamp": cb.timestamp,
        "nonce": cb.nonce,
        "body_sha256": digest,
        "seen_at": received_at,
        "app_id": cb.app_id,
        "task_id": cb.task_id,
        "now": received_at,
    }
    if postgres:
        *row, claimed = driver_execute(conn, _PG_CLAIM_AND_LOCK, claim)
        if row[0] is None:  # created by another transaction meanwhile (see the statement)
            *row, claimed = driver_execute(conn, _PG_LOCK_AND_CLAIM, claim)
        nonce_claimed = bool(claimed)
    else:
        nonce_claimed = conn.execute(_CLAIM_NONCE, claim).first() is not None
        row = list(conn.execute(_UPSERT_TASK, claim).one())
    if not nonce_claimed:
        _check_retransmission(conn, cb, digest)
    task = TaskState(*row)

    delivery = {
        **cb.audit_fields(),
        "received_at": received_at,
        "task_pk": task.id,
        "remote_addr": remote_addr,
        "body_size": body_size,
        "raw_body": raw_body,
        "event_key": None,
        "verdict": "duplicate",
        "reason": "same_nonce",
    }
    if nonce_claimed:
        # The rules first: the verdict goes into the same INSERT that claims the event key.
        run_before = _run_of(task)
        verdict, reason = apply_to_task(task, cb, received_at)
        delivery.update(event_key=cb.event_key(), verdict=verdict, reason=reason)
        # The delivery keeps the callback's own status and stop_reason; the task's
        # columns of the same names get the task's.
        state = {**_task_values(task), **_run_values(task, run_before)}
        if postgres:
            values = {_DELIVERY_PREFIX + name: value for name, value in delivery.items()}
            values.update(state, input=pg_json(task.input), outputs=pg_json(task.outputs))
            row = driver_execute(conn, _PG_RECORD_AND_WRITE_BACK, values)
            delivery_id = None if row is None else row[0]
        else:
            delivery_id = conn.execute(_INSERT_DELIVERY_IGNORE, delivery).scalar()
            if delivery_id is not None:
                conn.execute(_WRITE_BACK_TASK, state)
                if state["run_changed"]:
                    # Only the run's own keys: Core would turn any other column-named
                    # key into a SET target.
                    run = {k: v for k, v in state.items() if k.startswith("run_")}
                    conn.execute(_CLOSE_EARLIER_RUNS, run)
                    conn.execute(_UPSERT_RUN, run)
        if delivery_id is not None:
            return Outcome(verdict, reason, task.id, delivery_id)
        # Another delivery holds the event key: this one is a resend, with a new nonce.
        delivery.update(event_key=None, verdict="duplicate", reason="same_event")
    conn.execute(_TOUCH_TASK, {"task_pk": task.id, "last_delivery_at": received_at})
    delivery_id = conn.execute(_INSERT_DELIVERY, delivery).scalar_one()
    return Outcome("duplicate", delivery["reason"], task.id, delivery_id)


def _check_retransmission(conn: Connection, cb: Callback, digest: str) -> None:
    """The (Timestamp, Nonce) was seen: the same body again is a retransmission, else refused.

    ZEGO's signature does not cover the body, so a captured signature could be
    replayed with a forged body; the same pair with different content is refused.
    """
    seen = conn.execute(
        _SEEN_DIGEST, {"zego_timestamp": cb.timestamp, "nonce": cb.nonce}
    ).scalar_one()
    if seen != digest:
        raise CallbackError(
            409,
            "nonce_reused",
            "this Timestamp and Nonce were already used with a different body",
            cb.audit_fields(),
        )


def _run_of(task: TaskState) -> tuple[Any, ...]:
    return (task.runs, task.owner, task.started_at, task.ended_at, task.stop_reason)


def _run_values(task: TaskState, before: tuple[Any, ...]) -> dict[str, Any]:
    """The current run's row in task_runs, and whether this delivery changed it."""
    return {
        "run_changed": task.runs > 0 and _run_of(task) != before,
        "run_task_pk": task.id,
        "run_number": task.runs,
        "run_owner": task.owner,
        "run_started_at": task.started_at,
        "run_ended_at": task.ended_at,
        "run_stop_reason": task.stop_reason,
    }


def pg_json(value: Any) -> Json | None:
    return None if value is None else Json(value)


def _task_values(task: TaskState) -> dict[str, Any]:
    values = {name: getattr(task, name) for name in _WRITTEN}
    values["task_pk"] = task.id
    return values


# --- statements, built once ---------------------------------------------------------

STATE_FIELDS = tuple(f.name for f in fields(TaskState))
# What the rules may change: every column of TaskState but the key.
_WRITTEN = tuple(name for name in STATE_FIELDS if name != "id")
_TASKS = cast(Table, Task.__table__)
_DELIVERIES = cast(Table, Delivery.__table__)
_NONCES = cast(Table, CallbackNonce.__table__)
_DELIVERY_COLUMNS = tuple(c.name for c in _DELIVERIES.columns if c.name != "id")
# The delivery's values in a statement that also writes the task back, whose status
# and stop_reason are other values under the same names.
_DELIVERY_PREFIX = "delivery_"
_NEW_TASK = {
    "status": "running",  # placeholder: a new task always applies its first delivery
    "state_seq": NO_POSITION,
    "state_rank": 0,
    "max_seq": NO_POSITION,
    "runs": 0,
    "run_floor_seq": NO_POSITION,
}
# SQL NULL, not JSON null, where a task has no input or outputs.
_JSON = JSON(none_as_null=True)
_TYPED = (bindparam("input", type_=_JSON), bindparam("outputs", type_=_JSON))


def _insert_columns(names: tuple[str, ...], prefix: str) -> str:
    """(columns) VALUES (placeholders), each placeholder the column's name after `prefix`."""
    placeholders = ", ".join(f"%({prefix}{name})s" for name in names)
    return f"({', '.join(names)}) VALUES ({placeholders})"


def _set_clause(names: tuple[str, ...]) -> str:
    return ", ".join(f"{name} = %({name})s" for name in names)


_NEW_TASK_SQL = ", ".join(
    f"'{value}'" if isinstance(value, str) else str(value) for value in _NEW_TASK.values()
)

# PostgreSQL statements run on the DBAPI cursor (see sqlutil.driver_execute), hence
# psycopg's %(name)s placeholders.
#
# Step 1: create or lock the task, then claim the nonce. An existing task is locked by
# SELECT … FOR UPDATE, which writes no new row version: an ON CONFLICT DO UPDATE would,
# with an entry in each of the task's indexes, only for the write-back to replace it.
# The nonce is claimed from the task's row, so the task is always locked first, as on
# the fast path (manager/pg_fastpath.py). A task that another transaction created and
# committed while this statement waited on its INSERT is in neither branch (it is newer
# than the statement's snapshot): the row then comes back with a NULL id and no nonce
# claimed, and _PG_LOCK_AND_CLAIM, a statement of its own, does both.
_TASK_COLUMNS = ", ".join("t." + name for name in STATE_FIELDS)


def _claim_nonce_cte(source: str) -> str:
    """CTE `n`: the nonce claimed once for each row of `source`; a row if it was free,
    claimed from the locked task's row so that the task is always locked first."""
    return f"""n AS (
        INSERT INTO callback_nonces (zego_timestamp, nonce, body_sha256, seen_at)
        SELECT %(zego_timestamp)s::bigint, %(nonce)s::varchar, %(body_sha256)s::varchar,
            %(seen_at)s::timestamp
        FROM {source}
        ON CONFLICT DO NOTHING
        RETURNING 1
    )"""  # noqa: S608 - a CTE's name, values bound


_PG_CLAIM_AND_LOCK = f"""
    WITH created AS (
        INSERT INTO tasks AS t (
            app_id, task_id, {", ".join(_NEW_TASK)}, first_seen_at, updated_at
        )
        VALUES (%(app_id)s, %(task_id)s, {_NEW_TASK_SQL}, %(now)s, %(now)s)
        ON CONFLICT (app_id, task_id) DO NOTHING
        RETURNING {_TASK_COLUMNS}
    ), locked AS (
        SELECT {_TASK_COLUMNS} FROM tasks AS t
        WHERE t.app_id = %(app_id)s AND t.task_id = %(task_id)s
        FOR UPDATE OF t
    ), task AS (
        SELECT * FROM created UNION ALL SELECT * FROM locked
    ), {_claim_nonce_cte("task")}
    SELECT task.*, (SELECT count(*) FROM n) AS claimed
    FROM (SELECT) AS one LEFT JOIN task ON true
"""  # noqa: S608 - column names from the model, values bound
_PG_LOCK_AND_CLAIM = f"""
    WITH task AS (
        SELECT {_TASK_COLUMNS} FROM tasks AS t
        WHERE t.app_id = %(app_id)s AND t.task_id = %(task_id)s
        FOR UPDATE OF t
    ), {_claim_nonce_cte("task")}
    SELECT task.*, (SELECT count(*) FROM n) AS claimed FROM task
"""  # noqa: S608 - column names from the model, values bound

# Step 2: record the delivery under its event key and, only if the key was free, write
# the task back, and its current run where this delivery changed it (a run that a
# new one follows without a stop callback ends where the new one starts). No row:
# another delivery holds the key.
_PG_RECORD_AND_WRITE_BACK = f"""
    WITH d AS (
        INSERT INTO deliveries {_insert_columns(_DELIVERY_COLUMNS, _DELIVERY_PREFIX)}
        ON CONFLICT (event_key) DO NOTHING
        RETURNING id
    ), written AS (
        UPDATE tasks SET {_set_clause(_WRITTEN)}
        WHERE id = %(task_pk)s AND EXISTS (SELECT FROM d)
    ), closed AS (
        UPDATE task_runs SET ended_at = %(run_started_at)s::timestamp
        WHERE task_pk = %(task_pk)s AND run_no < %(run_number)s AND ended_at IS NULL
            AND %(run_changed)s::boolean AND EXISTS (SELECT FROM d)
    ), run AS (
        INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason)
        SELECT %(task_pk)s::integer, %(run_number)s::integer, %(run_owner)s::varchar,
            %(run_started_at)s::timestamp, %(run_ended_at)s::timestamp,
            %(run_stop_reason)s::smallint
        WHERE %(run_changed)s::boolean AND EXISTS (SELECT FROM d)
        ON CONFLICT (task_pk, run_no) DO UPDATE SET owner = EXCLUDED.owner,
            started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
            stop_reason = EXCLUDED.stop_reason
    )
    SELECT id FROM d
"""  # noqa: S608 - column names from the model, values bound

# SQLite (and any other backend): the same steps, one statement each.
_CLAIM_NONCE = (
    sqlite.insert(_NONCES)
    .values({c: bindparam(c) for c in ("zego_timestamp", "nonce", "body_sha256", "seen_at")})
    .on_conflict_do_nothing()
    .returning(_NONCES.c.nonce)
)
_UPSERT_TASK = (
    sqlite.insert(_TASKS)
    .values(
        app_id=bindparam("app_id"),
        task_id=bindparam("task_id"),
        first_seen_at=bindparam("now", type_=DateTime()),
        updated_at=bindparam("now", type_=DateTime()),
        **_NEW_TASK,
    )
    .on_conflict_do_update(
        index_elements=[_TASKS.c.app_id, _TASKS.c.task_id],
        set_={"app_id": sqlite.insert(_TASKS).excluded.app_id},
    )
    .returning(*(_TASKS.c[name] for name in STATE_FIELDS))
)
_INSERT_DELIVERY_IGNORE = (
    sqlite.insert(_DELIVERIES)
    .values({c: bindparam(c) for c in _DELIVERY_COLUMNS})
    .on_conflict_do_nothing(index_elements=[_DELIVERIES.c.event_key])
    .returning(_DELIVERIES.c.id)
)
_WRITE_BACK_TASK = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("task_pk"))
    .values({name: bindparam(name) for name in _WRITTEN if name not in ("input", "outputs")})
    .values(input=_TYPED[0], outputs=_TYPED[1])
)

_RUNS = cast(Table, TaskRun.__table__)
_CLOSE_EARLIER_RUNS = (
    update(_RUNS)
    .where(
        _RUNS.c.task_pk == bindparam("run_task_pk"),
        _RUNS.c.run_no < bindparam("run_number"),
        _RUNS.c.ended_at.is_(None),
    )
    .values(ended_at=bindparam("run_started_at", type_=DateTime()))
)
_RUN_COLUMNS = {
    "task_pk": bindparam("run_task_pk"),
    "run_no": bindparam("run_number"),
    "owner": bindparam("run_owner"),
    "started_at": bindparam("run_started_at", type_=DateTime()),
    "ended_at": bindparam("run_ended_at", type_=DateTime()),
    "stop_reason": bindparam("run_stop_reason"),
}
_UPSERT_RUN = (
    sqlite.insert(_RUNS)
    .values(_RUN_COLUMNS)
    .on_conflict_do_update(
        index_elements=[_RUNS.c.task_pk, _RUNS.c.run_no],
        set_={
            c: sqlite.insert(_RUNS).excluded[c]
            for c in ("owner", "started_at", "ended_at", "stop_reason")
        },
    )
)

# Every backend: the nonce's digest, and the record of a duplicate.
_SEEN_DIGEST = select(_NONCES.c.body_sha256).where(
    _NONCES.c.zego_timestamp == bindparam("zego_timestamp"),
    _NONCES.c.nonce == bindparam("nonce"),
)
_TOUCH_TASK = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("task_pk"))
    .values(last_delivery_at=bindparam("last_delivery_at"))
)
_INSERT_DELIVERY = (
    insert(_DELIVERIES)
    .values({c: bindparam(c) for c in _DELIVERY_COLUMNS})
    .returning(_DELIVERIES.c.id)
)


def apply_to_task(task: TaskState, cb: Callback, now: datetime) -> tuple[str, str | None]:
    """Apply the ordering rules to a locked task; returns (verdict, reason)."""
    position = (cb.sequence, event_rank(cb))
    at = utc_from_timestamp(cb.timestamp)

    task.max_seq = max(task.max_seq, cb.sequence)
    task.last_delivery_at = now
    if cb.is_stop:
        applied = _apply_stop(task, cb, position, at)
    else:
        _remember_details(task, cb, position)
        applied = _apply_start(task, cb, position, at)
    if applied:
        task.updated_at = now
        return "applied", None
    return "stale", "older_than_state"


def _is_fresh(task: TaskState) -> bool:
    return task.state_seq == NO_POSITION and task.state_rank == 0


def _apply_stop(task: TaskState, cb: Callback, position: tuple[int, int], at: datetime) -> bool:
    current = (task.state_seq, task.state_rank)
    fresh = _is_fresh(task)
    active = task.status in ACTIVE
    # ZEGO documents neither the Sequence of its own stops nor that it echoes ours,
    # so a stop may also end the run by Sequence or, for StopReason 1, by Timestamp.
    by_sequence = active and task.run_start_seq is not None and cb.sequence >= task.run_start_seq
    by_time = (
        active and cb.stop_reason == 1 and task.started_at is not None and at >= task.started_at
    )
    if not (fresh or position > current or by_sequence or by_time):
        return False
    if fresh:
        task.runs = 1  # the stop proves that a run existed, even if its start never came
    task.status = "failed" if cb.stop_reason == 1 else "stopped"
    task.stop_reason = cb.stop_reason
    task.ended_at = at
    # Starts above end_seq come after this stop. A stop placed by its Timestamp alone
    # covers everything the run had seen.
    placed_by_time = by_time and not by_sequence and not position > current
    task.end_seq = max(cb.sequence, current[0]) if placed_by_time else cb.sequence
    task.state_seq, task.state_rank = max(position, (current[0], RANK_STOPPED))
    return True


def _apply_start(task: TaskState, cb: Callback, position: tuple[int, int], at: datetime) -> bool:
    current = (task.state_seq, task.state_rank)
    fresh = _is_fresh(task)
    ended = task.status in ENDED
    # A TranscodeStarted above the Sequence of the stop that ended the run is a new
    # run, even when that stop was placed above it by the Sequence-or-Timestamp rule.
    restart = (
        ended
        and cb.status == STATUS_STARTED
        and task.end_seq is not None
        and cb.sequence > task.end_seq
    )
    # An automatic stop (StopReason 1) ends every start that is not later than it.
    failed_after = task.status == "failed" and task.ended_at is not None and at <= task.ended_at

    if not fresh and (position > current or restart) and failed_after:
        # Arrival in order would have applied this start and then the failure on top.
        task.end_seq = max(NO_POSITION if task.end_seq is None else task.end_seq, cb.sequence)
        task.state_seq, task.state_rank = max(current, (cb.sequence, RANK_STOPPED))
    elif fresh or position > current or restart:
        if fresh or ended or cb.status == STATUS_STARTED:
            task.runs += 1
            if fresh:
                task.run_floor_seq = NO_POSITION
            elif ended and task.end_seq is not None:
                task.run_floor_seq = task.end_seq
            else:
                task.run_floor_seq = max(task.run_floor_seq, cb.sequence - 1)
            task.run_start_seq, task.run_start_rank = position
            task.started_at = at
            task.ended_at = None
            task.stop_reason = None
            task.end_seq = None
        task.status = "running"
        task.state_seq, task.state_rank = max(position, (current[0], RANK_UPDATED))
        return True

    _place_in_run(task, cb, position, at)
    return False


def _place_in_run(task: TaskState, cb: Callback, position: tuple[int, int], at: datetime) -> None:
    """A late start still tells when the current run began; the status stays as it is.

    The run begins at its latest TranscodeStarted (an earlier one belongs to an
    earlier run), or, where none has come, at its earliest update.
    """
    if cb.sequence <= task.run_floor_seq:
        return  # an earlier run
    if task.status in ENDED and task.end_seq is not None and cb.sequence > task.end_seq:
        return  # after the end of this run, yet not a start of a new one
    start = (
        None
        if task.run_start_seq is None or task.run_start_rank is None
        else (task.run_start_seq, task.run_start_rank)
    )
    begun_by_start = start is not None and start[1] == RANK_STARTED
    if cb.status == STATUS_STARTED and (start is None or position > start):
        if begun_by_start:
            task.runs += 1  # a restart we had not heard of
    elif start is not None and (begun_by_start or position >= start):
        return
    task.run_start_seq, task.run_start_rank = position
    task.started_at = at


def _remember_details(task: TaskState, cb: Callback, position: tuple[int, int]) -> None:
    """Owner, input and outputs come from the newest start/update, whatever its verdict.

    Each is a max-register keyed by (Sequence, rank), so the result does not depend
    on arrival order; Details count only where a delivery carries them.
    """
    if _newer(position, task.owner_seq, task.owner_rank):
        task.owner_seq, task.owner_rank = position
        task.owner = cb.user_id
    if (cb.input is not None or cb.outputs is not None) and _newer(
        position, task.details_seq, task.details_rank
    ):
        task.details_seq, task.details_rank = position
        task.input = cb.input
        task.outputs = cb.outputs


def _newer(position: tuple[int, int], seq: int | None, rank: int | None) -> bool:
    return seq is None or rank is None or position > (seq, rank)
