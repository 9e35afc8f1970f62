"""Record a verified callback and keep its task and runs what its events make them.

The rules live in manager/callbacks/rules.py; this module stores what they return,
on every backend: the webhook's callbacks (`apply_optimistically`, `create_task`,
`apply_callback`), our own stop requests that ZEGOCLOUD accepted
(`apply_accepted_stops`) and `manager rebuild` (manager/rebuild.py, through `diff` and
`write_back`).

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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from psycopg.types.json import Json
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Table,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from manager.callbacks.rules import (
    ENDED,
    FAILED_ON_ITS_OWN,
    NO_POSITION,
    Ending,
    Event,
    History,
    Rank,
    Run,
    TaskStatus,
    extend,
    fold,
)
from manager.clock import utcnow
from manager.models import CallbackNonce, Delivery, StopAttempt, StopRequest, Task, TaskRun
from manager.sqlutil import driver_execute, driver_send
from manager.zego.callbacks import STATUS_STARTED, Callback, CallbackError

__all__ = ["ENDED", "Outcome", "TaskState", "apply_callback", "utcnow"]

# ZEGOCLOUD retries a callback 5 times within about 62 s (zego-reference.md §6.2); twice
# that, to be safe, tells a resend of a failure stop from another failure.
RESEND_SPAN = timedelta(seconds=120)


@dataclass(frozen=True)
class Outcome:
    verdict: str
    reason: str | None
    task_pk: int
    delivery_id: int
    refolded: bool | None = None  # None: a duplicate, which changes nothing


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
    runs: int
    last_failure_at: datetime | None
    run_start_seen: bool
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime
    last_delivery_at: datetime | None


Details = tuple[Any, Any]  # a task's (input, outputs)


@dataclass(frozen=True)
class Change:
    """What an event did to its task: its history after, and the runs to write."""

    history: History
    changed: bool
    runs: list[tuple[int, Run]]  # (run_no, run) to insert or replace
    owner_changed: bool
    full: bool  # refolded: runs above history.run_count are to be deleted


def utc_from_timestamp(ts: int) -> datetime:
    """ZEGOCLOUD's Unix seconds as the naive UTC datetime stored everywhere."""
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def event_of(cb: Callback) -> Event:
    if cb.is_stop:
        rank = Rank.STOPPED
    else:
        rank = Rank.STARTED if cb.status == STATUS_STARTED else Rank.UPDATED
    return Event(
        rank=rank,
        sequence=cb.sequence,
        at=utc_from_timestamp(cb.timestamp),
        stop_reason=cb.stop_reason,
        user_id=cb.user_id,
    )


def history_of(task: TaskState) -> History:
    """The part of the fold that the task row keeps: its registers and its last run."""
    runs: tuple[Run, ...] = ()
    if task.runs > 0:
        ending = None
        if task.status in ENDED:
            ending = Ending.FAILED if task.status == TaskStatus.FAILED else Ending.STOPPED
        runs = (Run(task.started_at, task.ended_at, ending, start_seen=task.run_start_seen),)
    owner_position = None
    if task.owner_seq is not None and task.owner_rank is not None:
        owner_position = (task.owner_seq, task.owner_rank)
    return History(
        status=TaskStatus(task.status),
        position=(task.state_seq, task.state_rank),
        owner=task.owner,
        owner_position=owner_position,
        last_failure_at=task.last_failure_at,
        runs=runs,
        first_run=max(task.runs - 1, 0),
    )


def advance(conn: Connection, task: TaskState, event: Event, *, stored: bool) -> Change:
    """The task after one more event, by `extend` where it can tell, else by `fold`.

    `stored`: the event is already among the task's recorded events (a stop attempt
    is recorded before its task moves); a callback is recorded after.
    """
    before = history_of(task)
    after = extend(before, event)
    if after is None:
        events = load_events(conn, task.id)
        if not stored:
            events.append(event)
        return compare(conn, task, fold(events))
    return extended(before, after)


def extended(before: History, after: History) -> Change:
    """What `extend` did to a task: the runs it changed or opened, and whether anything."""
    runs = [
        (after.first_run + i + 1, run)
        for i, run in enumerate(after.runs)
        if after.first_run + i >= before.run_count or not run.same_as(before.runs[-1])
    ]
    owner_changed = after.owner != before.owner
    changed = bool(runs) or owner_changed or _task_fields(after) != _task_fields(before)
    return Change(after, changed, runs, owner_changed, full=False)


def compare(conn: Connection, task: TaskState, after: History) -> Change:
    """A whole fold against what is stored: the runs that differ, and whether anything does."""
    return diff(task, conn.execute(_RUNS_OF, {"task_pk": task.id}).all(), after)


def diff(task: TaskState, stored: Sequence[Any], after: History) -> Change:
    """A whole fold against the task's row and its stored runs (rows of run_no, owner,
    started_at, ended_at, stop_reason, in run_no order)."""
    runs = []
    for number, run in enumerate(after.runs, start=1):
        old = stored[number - 1] if number <= len(stored) else None
        if old is None or old.owner != after.owner or not run.same_as(stored_run(old)):
            runs.append((number, run))
    before = history_of(task)
    changed = (
        bool(runs)
        or len(stored) != after.run_count
        or after.owner != before.owner
        or _task_fields(after) != _task_fields(before)
    )
    return Change(after, changed, runs, owner_changed=False, full=True)


def stored_run(row: Any) -> Run:
    ending = None
    if row.ended_at is not None:
        ending = {0: Ending.STOPPED, 1: Ending.FAILED}.get(row.stop_reason, Ending.UNSEEN)
    return Run(row.started_at, row.ended_at, ending)


def _task_fields(h: History) -> tuple[Any, ...]:
    last = h.last_run
    return (
        h.status,
        h.position,
        h.owner,
        h.last_failure_at,
        h.run_count,
        None if last is None else (last.started_at, last.ended_at, last.stop_reason),
        None if last is None else last.start_seen,
    )


def load_events(conn: Connection, task_pk: int) -> list[Event]:
    """The task's recorded events: non-duplicate verified callbacks, accepted stops."""
    events = [delivery_event(row) for row in conn.execute(_EVENTS_OF, {"task_pk": task_pk})]
    events.extend(
        accepted_stop_event(row) for row in conn.execute(_ACCEPTED_STOPS_OF, {"task_pk": task_pk})
    )
    return events


def delivery_event(row: Any) -> Event:
    """The event of a recorded delivery (event, status, sequence, stop_reason,
    zego_timestamp, user_id)."""
    if row.event == "transcode_stop":
        rank = Rank.STOPPED
    else:
        rank = Rank.STARTED if row.status == STATUS_STARTED else Rank.UPDATED
    return Event(
        rank=rank,
        sequence=row.sequence or 0,
        at=utc_from_timestamp(row.zego_timestamp),
        stop_reason=row.stop_reason,
        user_id=row.user_id,
    )


def accepted_stop_event(row: Any) -> Event:
    """The event of a stop attempt that ZEGOCLOUD accepted (sequence, attempted_at)."""
    return Event(Rank.STOP_REQUEST, row.sequence, row.attempted_at)


def task_values(task: TaskState, change: Change) -> dict[str, Any]:
    """The task row's columns after the change, the registers outside the fold included."""
    h = change.history
    last = h.last_run
    owner_seq, owner_rank = (None, None) if h.owner_position is None else h.owner_position
    return {
        "task_pk": task.id,
        "status": str(h.status),
        "stop_reason": None if last is None else last.stop_reason,
        "state_seq": h.position[0],
        "state_rank": h.position[1],
        "max_seq": task.max_seq,
        "owner_seq": owner_seq,
        "owner_rank": owner_rank,
        "owner": h.owner,
        "details_seq": task.details_seq,
        "details_rank": task.details_rank,
        "runs": h.run_count,
        "last_failure_at": h.last_failure_at,
        "run_start_seen": last is not None and last.start_seen,
        "started_at": None if last is None else last.started_at,
        "ended_at": None if last is None else last.ended_at,
        "updated_at": task.updated_at,
        "last_delivery_at": task.last_delivery_at,
    }


def run_rows(task_pk: int, change: Change) -> list[dict[str, Any]]:
    return [
        {
            "run_task_pk": task_pk,
            "run_number": number,
            "run_owner": change.history.owner,
            "run_started_at": run.started_at,
            "run_ended_at": run.ended_at,
            "run_stop_reason": run.stop_reason,
        }
        for number, run in change.runs
    ]


def write_back(conn: Connection, task: TaskState, change: Change) -> None:
    """Write the task and its changed runs with portable statements (any backend)."""
    conn.execute(_WRITE_BACK_TASK, task_values(task, change))
    _write_runs(conn, task.id, change)


def _write_runs(conn: Connection, task_pk: int, change: Change) -> None:
    rows = run_rows(task_pk, change)
    if rows:
        conn.execute(_UPSERT_RUN[conn.dialect.name], rows)
    if change.owner_changed:
        conn.execute(_SET_RUN_OWNERS, {"run_task_pk": task_pk, "owner": change.history.owner})
    if change.full:
        conn.execute(
            _DELETE_RUNS_AFTER, {"run_task_pk": task_pk, "count": change.history.run_count}
        )


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
    claim = {
        **_nonce_claim(cb, received_at, digest),
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

    delivery = _delivery_row(
        cb, task.id, raw_body, body_size, received_at, remote_addr, "duplicate", "same_nonce"
    )
    if not nonce_claimed:
        return _record_duplicate(conn, task, delivery)

    # The rules first: the verdict goes into the same INSERT that claims the event key.
    event = event_of(cb)
    change = advance(conn, task, event, stored=False)
    verdict, reason, details = _settle(task, cb, change, received_at)
    key = cb.event_key()
    # Only a refold can meet a failure of the same key (see _another_failure).
    if change.full and event.is_failure and _another_failure(conn, task.id, cb):
        key = cb.event_key(at_timestamp=True)
    delivery.update(event_key=key, verdict=verdict, reason=reason)

    def outcome(delivery_id: int | None, duplicate_id: int | None) -> Outcome:
        if delivery_id is not None:
            return Outcome(verdict, reason, task.id, delivery_id, refolded=change.full)
        # Another delivery holds the event key: this one is a resend, with a new nonce.
        assert duplicate_id is not None  # noqa: S101 - the statement writes one or the other
        return Outcome("duplicate", "same_event", task.id, duplicate_id)

    if postgres:
        values = _pg_values(task, change, delivery, details)
        variant = (bool(change.runs), change.owner_changed, change.full)
        cursor = driver_send(conn, _PG_RECORD_AND_WRITE_BACK[variant], values)
        return lambda: outcome(*cursor.fetchone())
    delivery_id = conn.execute(_INSERT_DELIVERY_IGNORE, delivery).scalar()
    if delivery_id is not None:
        write_back(conn, task, change)
        if details is not None:
            conn.execute(
                _WRITE_DETAILS, {"task_pk": task.id, "input": details[0], "outputs": details[1]}
            )
        return lambda: outcome(delivery_id, None)
    delivery.update(event_key=None, verdict="duplicate", reason="same_event")
    return _record_duplicate(conn, task, delivery)


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
    row = driver_execute(conn, _PG_READ_TASK, {"app_id": cb.app_id, "task_id": cb.task_id})
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
    verdict, reason, details = _settle(task, cb, change, received_at)
    delivery = _delivery_row(
        cb, task.id, raw_body, body_size, received_at, remote_addr, verdict, reason
    )
    delivery["event_key"] = cb.event_key()
    values = _pg_values(task, change, delivery, details)
    values.update(_nonce_claim(cb, received_at, cb.body_digest()), version=version)
    variant = (bool(change.runs), change.owner_changed, change.full)
    try:
        written = driver_execute(conn, _PG_GUARDED_WRITE[variant], values)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION:
            return None
        raise
    if written is None:
        return None
    return Outcome(verdict, reason, task.id, written[0], refolded=False)


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
    task = TaskState(
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
    )
    change = advance(conn, task, event_of(cb), stored=False)  # extends: reads nothing
    details = _newer_details(task, cb)
    delivery = _delivery_row(cb, 0, raw_body, body_size, received_at, remote_addr, "applied", None)
    delivery["event_key"] = cb.event_key()
    values = _pg_values(task, change, delivery, details)  # task_pk: the new row's id, in SQL
    values.update(
        _nonce_claim(cb, received_at, cb.body_digest()),
        app_id=cb.app_id,
        task_id=cb.task_id,
        first_seen_at=received_at,
    )
    try:
        task_pk, delivery_id = driver_execute(conn, _PG_CREATE_TASK, values)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION:
            return None
        raise
    return Outcome("applied", None, task_pk, delivery_id, refolded=False)


def _delivery_row(
    cb: Callback,
    task_pk: int,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
    verdict: str,
    reason: str | None,
) -> dict[str, Any]:
    """The delivery's row, without an event key (a duplicate has none)."""
    return {
        **cb.audit_fields(),
        "received_at": received_at,
        "task_pk": task_pk,
        "remote_addr": remote_addr,
        "body_size": body_size,
        "raw_body": raw_body,
        "event_key": None,
        "verdict": verdict,
        "reason": reason,
    }


def _nonce_claim(cb: Callback, received_at: datetime, digest: str) -> dict[str, Any]:
    """The parameters of a claim of the callback's (Timestamp, Nonce)."""
    return {
        "zego_timestamp": cb.timestamp,
        "nonce": cb.nonce,
        "body_sha256": digest,
        "seen_at": received_at,
    }


def _settle(
    task: TaskState, cb: Callback, change: Change, received_at: datetime
) -> tuple[str, str | None, Details | None]:
    """The delivery's verdict, and the task's registers outside the fold, moved on."""
    task.max_seq = max(task.max_seq, cb.sequence)
    task.last_delivery_at = received_at
    if change.changed:
        task.updated_at = received_at
    details = None if cb.is_stop else _newer_details(task, cb)
    if change.changed:
        return "applied", None, details
    return "stale", "older_than_state", details


def _record_duplicate(
    conn: Connection, task: TaskState, delivery: dict[str, Any]
) -> Callable[[], Outcome]:
    conn.execute(_TOUCH_TASK, {"task_pk": task.id, "last_delivery_at": delivery["received_at"]})
    delivery_id = conn.execute(_INSERT_DELIVERY, delivery).scalar_one()
    result = Outcome("duplicate", delivery["reason"], task.id, delivery_id)
    return lambda: result


def _pg_values(
    task: TaskState, change: Change, delivery: dict[str, Any], details: Details | None
) -> dict[str, Any]:
    """The parameters of _PG_RECORD_AND_WRITE_BACK."""
    values = {_DELIVERY_PREFIX + name: value for name, value in delivery.items()}
    values.update(task_values(task, change))
    values.update(
        new_details=details is not None,
        input=None if details is None else pg_json(details[0]),
        outputs=None if details is None else pg_json(details[1]),
        runs_json=json.dumps(
            [[n, _iso(r.started_at), _iso(r.ended_at), r.stop_reason] for n, r in change.runs]
        ),
    )
    return values


def _another_failure(conn: Connection, task_pk: int, cb: Callback) -> bool:
    """Whether this StopReason 1 stop is another failure of a key already recorded.

    ZEGOCLOUD's own stops often carry Sequence 0, so a task that fails in two runs sends
    the same key twice. A resend comes within ZEGOCLOUD's retry span (about 62 s), so
    a failure further than RESEND_SPAN from every recorded one of its key is new: it
    is recorded under its key at its Timestamp, whichever of the two came first.
    """
    recorded = (
        conn.execute(
            _FAILURE_TIMES,
            {"task_pk": task_pk, "sequence": cb.sequence, "event": cb.event, "status": cb.status},
        )
        .scalars()
        .all()
    )
    span = RESEND_SPAN.total_seconds()
    return bool(recorded) and all(abs(ts - cb.timestamp) > span for ts in recorded)


def lock_task(conn: Connection, task_pk: int) -> TaskState | None:
    """The task's row, locked for the rest of the transaction (FOR UPDATE on PostgreSQL)."""
    row = conn.execute(_LOCK_TASK, {"task_pk": task_pk}).first()
    return None if row is None else TaskState(*row)


def apply_accepted_stops(
    conn: Connection, accepted: Sequence[tuple[int, int]], at: datetime
) -> int:
    """Move tasks on by our stop requests that ZEGOCLOUD accepted (already recorded as
    successful attempts): (task id, Sequence) pairs. Returns how many tasks changed.

    A handful of statements whatever their number: the tasks are locked in one, in id
    order as every path that locks several does, and written back in one executemany
    (runs in another). Only a task that `extend` cannot move on alone (rare for a
    stop) is refolded from its events, on its own.
    """
    if not accepted:
        return 0
    latest: dict[int, int] = {}
    for task_pk, sequence in accepted:
        latest[task_pk] = max(sequence, latest.get(task_pk, sequence))
    tasks = [TaskState(*row) for row in conn.execute(_LOCK_TASKS, {"task_pks": sorted(latest)})]
    written: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for task in tasks:
        event = Event(Rank.STOP_REQUEST, latest[task.id], at)
        after = extend(history_of(task), event)
        if after is None:  # the whole history decides: one task at a time
            change = advance(conn, task, event, stored=True)
            if change.changed:
                write_back(conn, _stop_fields(task, change, latest[task.id], at), change)
            continue
        change = extended(history_of(task), after)
        if change.owner_changed:  # not from a stop, which names no owner; but if so
            write_back(conn, _stop_fields(task, change, latest[task.id], at), change)
        elif change.changed:
            written.append(task_values(_stop_fields(task, change, latest[task.id], at), change))
            runs += run_rows(task.id, change)
    if written:
        conn.execute(_WRITE_BACK_TASK, written)
    if runs:
        conn.execute(_UPSERT_RUN[conn.dialect.name], runs)
    return len(written)


def _stop_fields(task: TaskState, change: Change, sequence: int, at: datetime) -> TaskState:
    if change.history.status != task.status:
        # A re-stop of a task already stopping leaves when it became stopping,
        # which the stuck report shows and the re-stops wait from.
        task.updated_at = at
    task.max_seq = max(task.max_seq, sequence)
    return task


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


def _newer_details(task: TaskState, cb: Callback) -> Details | None:
    """The callback's input and outputs, if they are the task's now: they come from the
    newest start/update that carries them, whatever its verdict (a max-register keyed
    by (Sequence, rank), so arrival order cannot matter). They are not in the fold:
    deliveries keep them only in the raw body. Only a change is written, so the hot
    path never reads them back."""
    if cb.input is None and cb.outputs is None:
        return None
    position = event_of(cb).position
    if (
        task.details_seq is None
        or task.details_rank is None
        or position
        > (
            task.details_seq,
            task.details_rank,
        )
    ):
        task.details_seq, task.details_rank = position
        return (cb.input, cb.outputs)
    return None


def pg_json(value: Any) -> Json | None:
    return None if value is None else Json(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --- statements, built once ---------------------------------------------------------

STATE_FIELDS = tuple(f.name for f in fields(TaskState))
# What the rules may change: every column of TaskState but the key.
_WRITTEN = tuple(name for name in STATE_FIELDS if name != "id")
_TASKS = cast(Table, Task.__table__)
_DELIVERIES = cast(Table, Delivery.__table__)
_NONCES = cast(Table, CallbackNonce.__table__)
_RUNS = cast(Table, TaskRun.__table__)
_DELIVERY_COLUMNS = tuple(c.name for c in _DELIVERIES.columns if c.name != "id")
# The delivery's values in a statement that also writes the task back, whose status
# and stop_reason are other values under the same names.
_DELIVERY_PREFIX = "delivery_"
_NEW_TASK = {
    "status": "running",  # placeholder: a new task always applies its first delivery
    "state_seq": NO_POSITION[0],
    "state_rank": NO_POSITION[1],
    "max_seq": NO_POSITION[0],
    "runs": 0,
    "run_start_seen": False,
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
    f"'{value}'" if isinstance(value, str) else str(value).lower() for value in _NEW_TASK.values()
)

# PostgreSQL statements run on the DBAPI cursor (see sqlutil.driver_execute), hence
# psycopg's %(name)s placeholders.
#
# Step 1: create or lock the task, then claim the nonce. An existing task is locked by
# SELECT … FOR UPDATE, which writes no new row version: an ON CONFLICT DO UPDATE would,
# with an entry in each of the task's indexes, only for the write-back to replace it.
# The nonce is claimed from the task's row, so the task is always locked first. A task
# that another transaction created and committed while this statement waited on its
# INSERT is in neither branch (it is newer than the statement's snapshot): the row then
# comes back with a NULL id and no nonce claimed, and _PG_LOCK_AND_CLAIM, a statement
# of its own, does both.
_TASK_COLUMNS = ", ".join("t." + name for name in STATE_FIELDS)


def _claim_nonce_cte(source: str, *, or_fail: bool = False) -> str:
    """CTE `n`: the nonce claimed once for each row of `source`, so that the task is
    always locked first; a row if it was free. With `or_fail`, a plain INSERT: a nonce
    seen before fails the whole statement instead."""
    on_conflict = "" if or_fail else "ON CONFLICT DO NOTHING"
    return f"""n AS (
        INSERT INTO callback_nonces (zego_timestamp, nonce, body_sha256, seen_at)
        SELECT %(zego_timestamp)s::bigint, %(nonce)s::varchar, %(body_sha256)s::varchar,
            %(seen_at)s::timestamp
        FROM {source}
        {on_conflict}
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
# the task back and its changed runs (a JSON list of [run_no, started_at, ended_at,
# stop_reason]); where the owner changed, the other runs take it too, and after a
# whole fold the runs beyond its count go. If another delivery holds the key, this one
# is a resend: it is recorded as a duplicate, and the task only notes its arrival.
# The CTEs never touch one row twice: the owner's update skips the runs written here,
# the trim those above the count, and the task is written or touched, never both.
# Returns (the delivery's id, None), or (None, the duplicate's id).
_DUPLICATE = {"event_key": "NULL", "verdict": "'duplicate'", "reason": "'same_event'"}
_DUPLICATE_VALUES = ", ".join(
    _DUPLICATE.get(name, f"%({_DELIVERY_PREFIX}{name})s") for name in _DELIVERY_COLUMNS
)


def _pg_record_and_write_back(runs: bool, owners: bool, trim: bool) -> str:
    """The statement, with only the parts a change needs: PostgreSQL runs every part of
    a statement, even those whose condition is false."""
    parts = [
        f"""d AS (
        INSERT INTO deliveries {_insert_columns(_DELIVERY_COLUMNS, _DELIVERY_PREFIX)}
        ON CONFLICT (event_key) DO NOTHING
        RETURNING id
    )""",
        f"""written AS (
        UPDATE tasks SET {_TASK_SET}
        WHERE id = %(task_pk)s AND EXISTS (SELECT FROM d)
    )""",  # noqa: S608 - column names from the model, values bound
        *_run_parts(runs, owners, trim),
        f"""dup AS (
        INSERT INTO deliveries ({", ".join(_DELIVERY_COLUMNS)})
        SELECT {_DUPLICATE_VALUES} WHERE NOT EXISTS (SELECT FROM d)
        RETURNING id
    ), touched AS (
        UPDATE tasks SET last_delivery_at = %(last_delivery_at)s
        WHERE id = %(task_pk)s AND NOT EXISTS (SELECT FROM d)
    )""",  # noqa: S608 - column names from the model, values bound
    ]
    return f"WITH {', '.join(parts)} SELECT (SELECT id FROM d), (SELECT id FROM dup)"  # noqa: S608


def _pg_guarded_write(runs: bool, owners: bool, trim: bool) -> str:
    """apply_optimistically's one statement: write the task back only if it is still the
    row version the rules read, then claim the nonce and record the delivery, with
    plain INSERTs that fail the statement (undoing it) on a nonce seen or an event key
    taken. No row: the task changed meanwhile, and nothing was written."""
    parts = [
        f"""u AS (
        UPDATE tasks SET {_TASK_SET}
        WHERE id = %(task_pk)s AND xmin = %(version)s::text::xid
        RETURNING id
    ), {_claim_nonce_cte("u", or_fail=True)}, d AS (
        INSERT INTO deliveries ({", ".join(_DELIVERY_COLUMNS)})
        SELECT {", ".join(f"%({_DELIVERY_PREFIX}{name})s" for name in _DELIVERY_COLUMNS)}
        FROM n
        RETURNING id
    )""",  # noqa: S608 - column names from the model, values bound
        *_run_parts(runs, owners, trim),
    ]
    return f"WITH {', '.join(parts)} SELECT id FROM d"  # noqa: S608


def _run_parts(runs: bool, owners: bool, trim: bool) -> list[str]:
    """The CTEs that write a change's runs, once the delivery `d` is recorded."""
    parts = []
    if runs:
        parts.append("""changed AS (
        SELECT (r->>0)::integer AS run_no, (r->>1)::timestamp AS started_at,
            (r->>2)::timestamp AS ended_at, (r->>3)::smallint AS stop_reason
        FROM json_array_elements(%(runs_json)s::json) AS r
    ), run AS (
        INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason)
        SELECT %(task_pk)s::integer, run_no, %(owner)s::varchar, started_at, ended_at,
            stop_reason
        FROM changed WHERE EXISTS (SELECT FROM d)
        ON CONFLICT (task_pk, run_no) DO UPDATE SET owner = EXCLUDED.owner,
            started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
            stop_reason = EXCLUDED.stop_reason
    )""")
    if owners:
        written_runs = "AND run_no NOT IN (SELECT run_no FROM changed)" if runs else ""
        parts.append(f"""owners AS (
        UPDATE task_runs SET owner = %(owner)s::varchar
        WHERE task_pk = %(task_pk)s AND EXISTS (SELECT FROM d) {written_runs}
    )""")  # noqa: S608 - fixed text, values bound
    if trim:
        parts.append("""trimmed AS (
        DELETE FROM task_runs
        WHERE task_pk = %(task_pk)s AND run_no > %(runs)s AND EXISTS (SELECT FROM d)
    )""")
    return parts


_TASK_SET = f"""{_set_clause(_WRITTEN)},
            input = CASE WHEN %(new_details)s THEN %(input)s::json ELSE input END,
            outputs = CASE WHEN %(new_details)s THEN %(outputs)s::json ELSE outputs END"""
_VARIANTS = [(r, o, t) for r in (False, True) for o in (False, True) for t in (False, True)]
_PG_GUARDED_WRITE = {variant: _pg_guarded_write(*variant) for variant in _VARIANTS}
_PG_READ_TASK = f"""
    SELECT {_TASK_COLUMNS}, t.xmin::text FROM tasks AS t
    WHERE t.app_id = %(app_id)s AND t.task_id = %(task_id)s
"""  # noqa: S608 - column names from the model, values bound

# One constant string per variant, so that each keeps its cursor and prepared statement.
_PG_RECORD_AND_WRITE_BACK = {variant: _pg_record_and_write_back(*variant) for variant in _VARIANTS}

# A new task's first TranscodeStarted, in one statement (create_task). Plain INSERTs:
# a task, nonce or event key already there fails the statement on its unique key.
UNIQUE_VIOLATION = "23505"
_PG_CREATE_TASK = f"""
    WITH t AS (
        INSERT INTO tasks (app_id, task_id, first_seen_at, input, outputs, {", ".join(_WRITTEN)})
        VALUES (%(app_id)s, %(task_id)s, %(first_seen_at)s, %(input)s::json, %(outputs)s::json,
            {", ".join(f"%({name})s" for name in _WRITTEN)})
        RETURNING id
    ), {_claim_nonce_cte("t", or_fail=True)}, d AS (
        INSERT INTO deliveries ({", ".join(_DELIVERY_COLUMNS)})
        SELECT {
    ", ".join(
        "t.id" if name == "task_pk" else f"%({_DELIVERY_PREFIX}{name})s"
        for name in _DELIVERY_COLUMNS
    )
}
        FROM t, n
        RETURNING id
    ), run AS (
        INSERT INTO task_runs (task_pk, run_no, owner, started_at)
        SELECT t.id, 1, %(owner)s::varchar, %(started_at)s::timestamp FROM t, d
    )
    SELECT t.id, d.id FROM t, d
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

# Every backend.
TASK_STATE = select(*(_TASKS.c[name] for name in STATE_FIELDS))
_LOCK_TASK = TASK_STATE.where(_TASKS.c.id == bindparam("task_pk")).with_for_update()
_LOCK_TASKS = (
    TASK_STATE.where(_TASKS.c.id.in_(bindparam("task_pks", expanding=True)))
    .order_by(_TASKS.c.id)
    .with_for_update()
)
_WRITE_BACK_TASK = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("task_pk"))
    .values({name: bindparam(name) for name in _WRITTEN})
)
_WRITE_DETAILS = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("task_pk"))
    .values(input=_TYPED[0], outputs=_TYPED[1])
)
_RUN_COLUMNS = {
    "task_pk": bindparam("run_task_pk"),
    "run_no": bindparam("run_number"),
    "owner": bindparam("run_owner"),
    "started_at": bindparam("run_started_at", type_=DateTime()),
    "ended_at": bindparam("run_ended_at", type_=DateTime()),
    "stop_reason": bindparam("run_stop_reason"),
}


def _upsert_run(dialect_insert: Any) -> Any:
    statement = dialect_insert(_RUNS).values(_RUN_COLUMNS)
    return statement.on_conflict_do_update(
        index_elements=[_RUNS.c.task_pk, _RUNS.c.run_no],
        set_={c: statement.excluded[c] for c in ("owner", "started_at", "ended_at", "stop_reason")},
    )


_UPSERT_RUN = {"sqlite": _upsert_run(sqlite.insert), "postgresql": _upsert_run(postgresql.insert)}
_SET_RUN_OWNERS = (
    update(_RUNS)
    .where(_RUNS.c.task_pk == bindparam("run_task_pk"))
    .values(owner=bindparam("owner"))
)
_DELETE_RUNS_AFTER = delete(_RUNS).where(
    _RUNS.c.task_pk == bindparam("run_task_pk"), _RUNS.c.run_no > bindparam("count")
)
RUN_COLUMNS = (
    _RUNS.c.task_pk,
    _RUNS.c.run_no,
    _RUNS.c.owner,
    _RUNS.c.started_at,
    _RUNS.c.ended_at,
    _RUNS.c.stop_reason,
)
_RUNS_OF = (
    select(*RUN_COLUMNS).where(_RUNS.c.task_pk == bindparam("task_pk")).order_by(_RUNS.c.run_no)
)
EVENT_COLUMNS = (
    _DELIVERIES.c.task_pk,
    _DELIVERIES.c.event,
    _DELIVERIES.c.status,
    _DELIVERIES.c.sequence,
    _DELIVERIES.c.stop_reason,
    _DELIVERIES.c.zego_timestamp,
    _DELIVERIES.c.user_id,
)
# A delivery is one of its task's events when it holds its event key: verified, and
# not a duplicate (rejected and duplicate deliveries have none).
IS_EVENT = _DELIVERIES.c.event_key.is_not(None)
_EVENTS_OF = select(*EVENT_COLUMNS).where(_DELIVERIES.c.task_pk == bindparam("task_pk"), IS_EVENT)
ACCEPTED_STOP_COLUMNS = (StopRequest.task_pk, StopAttempt.sequence, StopAttempt.attempted_at)
ACCEPTED_STOPS = (
    select(*ACCEPTED_STOP_COLUMNS)
    .join(StopRequest, StopRequest.id == StopAttempt.stop_request_id)
    .where(StopAttempt.outcome == "success")
)
_ACCEPTED_STOPS_OF = ACCEPTED_STOPS.where(StopRequest.task_pk == bindparam("task_pk"))
_FAILURE_TIMES = select(_DELIVERIES.c.zego_timestamp).where(
    _DELIVERIES.c.task_pk == bindparam("task_pk"),
    _DELIVERIES.c.event == bindparam("event"),
    _DELIVERIES.c.sequence == bindparam("sequence"),
    _DELIVERIES.c.status.is_not_distinct_from(bindparam("status")),  # Status is optional
    _DELIVERIES.c.stop_reason == FAILED_ON_ITS_OWN,
    IS_EVENT,
)
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
