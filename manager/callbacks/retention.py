"""Delivery retention: what of a callback's record is kept past DELIVERY_RETENTION_DAYS.

Every delivery is stored with its raw body. Past the retention cutoff (now minus
DELIVERY_RETENTION_DAYS), `prune` deletes, in small batches:

- the raw body of every delivery (raw_body NULL). Nothing reads it back; the delivery
  keeps its parsed columns (event, Sequence, Status, StopReason, Timestamp, UserId,
  verdict), which the API and the dashboard show;
- the deliveries that are not events: `duplicate` and `rejected` ones, which hold no
  event key (a `stale` delivery is an event: it holds its key, and the fold reads it);
- the events of a task that is over: `stopped` or `failed`, every delivery of it
  received before the cutoff, and no stop request queued, or made or finished since.
  Its row and runs stay as they are; `pruned_histories` records the pruning.

What stays, because something still needs it:

- a task's row and every run (task_runs): its state and history, and every report
  figure built from runs (summary's tasks, runs and durations, owners, daily, stuck);
- the events of a task still `running` or `stopping`, or with a delivery or a stop
  request since the cutoff: a late callback may need the whole fold of its history;
- every stop request and attempt; run_days and delivery_hours, the reports' rollups;
- a delivery whose hour is not in delivery_hours yet: summary counts a window's whole
  hours from delivery_hours, and a report writes the rows it lacks from the deliveries,
  so a delivery's row goes only once its hour is written (call
  manager.reports.rollups.fill first, as a report would); until then only its body.
  What summary counts from the deliveries themselves, the partial hours at a window's
  ends and the deliveries of one owner (`owner=`), covers over the pruned past only
  what is kept.

A pruned task's event keys go with its events, so a resend of one of them, were it to
come after the retention (ZEGOCLOUD retries for about a minute), would count as new.

**A pruned history is folded from its last run.** The rules fold a task's events
(manager/callbacks/rules.py); once a task's old events are gone, its last run then
(run `runs` of its pruned_histories row) stands in for them: it enters the fold as two
events at Sequence -1, below every real one, its start (a TranscodeStarted if its
start was seen, else an update; none if unknown) and its stop or failure at its end,
and the events received since follow (history.py's `base_events` and `fold_pruned`,
which every refold of a pruned task takes: a late callback's, an accepted stop's,
`manager rebuild`'s). The row's max-registers (position, owner, latest failure) keep
what the pruned events gave them and are folded in as they are, so the row needs no
change: the next callback extends it as the webhook does for every task, and a refold
gives the same task and runs. Runs 1..runs - 1 never change again; every callback
since passed the freshness check, so it is later than anything pruned.

**Locks.** A batch is one short transaction over at most `batch_size` deliveries, a
range of the primary key. Callbacks only insert deliveries, never touch old ones, so
deleting old rows and dropping their bodies takes no lock a callback waits for, and a
task's row is not written. A batch locks the tasks it marks `FOR KEY SHARE SKIP
LOCKED` on PostgreSQL, the lock a foreign key takes: the webhook's optimistic write
goes on beside it, a task that a callback has locked to refold is left for the next
pass, and a callback that comes to refold a task being marked waits for the batch's
commit and then sees the mark. On SQLite a batch holds the write lock for a few
statements, as any write does. Each statement is safe on its own too: a task is
marked before its events go, and the fold of a marked task reads only the events
received since. Between batches, `pause` leaves the database to the callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Table,
    and_,
    bindparam,
    delete,
    func,
    literal,
    null,
    or_,
    select,
    text,
    update,
)

from manager.callbacks.history import IS_EVENT
from manager.callbacks.rules import ENDED
from manager.db import write_connection
from manager.models import Delivery, DeliveryHour, PrunedHistory, StopRequest, Task
from manager.sqlutil import insert_for
from manager.vocabulary import StopState

BATCH_SIZE = 1000
HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Batch:
    """What one batch did: deliveries looked at, bodies dropped, rows deleted."""

    last_id: int  # the highest delivery id looked at
    seen: int
    bodies: int
    deliveries: int
    tasks: int  # tasks whose history was pruned (marked)
    done: bool  # it reached deliveries younger than the cutoff, or the last one


@dataclass(frozen=True)
class Pruned:
    """What a `prune` did, for the caller's log line and metric."""

    cutoff: datetime  # bodies were dropped before this
    rows_until: datetime | None  # rows were deleted only before this (None: none)
    batches: int
    seen: int
    bodies: int
    deliveries: int
    tasks: int
    done: bool  # the pass reached the cutoff; else resume after `resume_after`
    resume_after: int  # pass as `after_id` to the next call (0 when done)
    busy: bool = False  # another process was pruning: nothing done


def retention_cutoff(now: datetime, retention_days: int) -> datetime:
    """Deliveries received before this are past the retention."""
    return now - timedelta(days=retention_days)


def prune(
    engine: Engine,
    *,
    now: datetime,
    retention_days: int,
    batch_size: int = BATCH_SIZE,
    max_batches: int | None = None,
    pause: float = 0.0,
    after_id: int = 0,
) -> Pruned:
    """Drop bodies and delete deliveries past the retention, a batch per transaction.

    Stops at the first delivery younger than the cutoff, or after `max_batches`; then
    `resume_after` says where the next call may go on (`after_id`). Sleeps `pause`
    seconds between batches. Commits each batch itself (an engine, not a session). One
    process prunes at a time: while another does, this returns at once (`busy`).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cutoff = retention_cutoff(now, retention_days)
    with _one_pruner(engine) as alone:
        if not alone:
            return Pruned(cutoff, None, 0, 0, 0, 0, 0, False, after_id, busy=True)
        return _prune(engine, cutoff, batch_size, max_batches, pause, after_id)


def _prune(
    engine: Engine,
    cutoff: datetime,
    batch_size: int,
    max_batches: int | None,
    pause: float,
    after_id: int,
) -> Pruned:
    with engine.connect() as conn:
        until = rows_until(conn, cutoff)
    batches: list[Batch] = []
    after, done = after_id, False
    while not done and (max_batches is None or len(batches) < max_batches):
        if batches and pause > 0:
            time.sleep(pause)
        with write_connection(engine) as conn:
            batch = prune_batch(
                conn, after_id=after, batch_size=batch_size, cutoff=cutoff, rows_until=until
            )
        batches.append(batch)
        after, done = batch.last_id, batch.done
    return Pruned(
        cutoff=cutoff,
        rows_until=until,
        batches=len(batches),
        seen=sum(b.seen for b in batches),
        bodies=sum(b.bodies for b in batches),
        deliveries=sum(b.deliveries for b in batches),
        tasks=sum(b.tasks for b in batches),
        done=done,
        resume_after=0 if done else after,
    )


@contextmanager
def _one_pruner(engine: Engine) -> Iterator[bool]:
    """Whether this process may prune: on PostgreSQL, a session advisory lock held for
    the call (several workers may run; two pruners would only get in each other's way).
    SQLite runs one write at a time anyway."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        alone = bool(conn.scalar(_TRY_LOCK))
        conn.commit()  # the lock outlives the transaction; no snapshot is held meanwhile
        try:
            yield alone
        finally:
            if alone:
                conn.execute(_UNLOCK)
                conn.commit()


def rows_until(conn: Connection, cutoff: datetime) -> datetime | None:
    """Rows may be deleted before this: the cutoff, or the end of the hours that
    delivery_hours holds if that is earlier (None when it holds none)."""
    last_hour = conn.scalar(select(func.max(DeliveryHour.hour)))
    if last_hour is None:
        return None
    return min(cutoff, _as_datetime(last_hour) + HOUR)


def prune_batch(
    conn: Connection,
    *,
    after_id: int,
    batch_size: int,
    cutoff: datetime,
    rows_until: datetime | None,
) -> Batch:
    """One batch: the next `batch_size` deliveries after `after_id`. Never commits."""
    seen, high, newest = conn.execute(_SCAN, {"after": after_id, "n": batch_size}).one()
    if not seen:
        return Batch(after_id, 0, 0, 0, 0, done=True)
    newest = _as_datetime(newest)
    window = {"after": after_id, "high": high}
    tasks = deliveries = 0
    if rows_until is not None:
        until = {**window, "until": rows_until}
        tasks = _rowcount(conn.execute(_MARK[conn.dialect.name], until))
        deliveries = _rowcount(conn.execute(_DELETE, until))
    bodies = _rowcount(conn.execute(_DROP_BODIES, {**window, "cutoff": cutoff}))
    done = seen < batch_size or newest >= cutoff
    return Batch(high, int(seen), bodies, deliveries, tasks, done)


# --- statements, built once ---------------------------------------------------------

_TASKS = cast(Table, Task.__table__)
_DELIVERIES = cast(Table, Delivery.__table__)
_STOPS = cast(Table, StopRequest.__table__)
_PRUNED = cast(Table, PrunedHistory.__table__)
_D = _DELIVERIES.c

_LOCK_KEY = "hashtext('manager.delivery_retention')"
_TRY_LOCK = text(f"SELECT pg_try_advisory_lock({_LOCK_KEY})")
_UNLOCK = text(f"SELECT pg_advisory_unlock({_LOCK_KEY})")

_SCANNED = select(_D.id, _D.received_at).where(_D.id > bindparam("after"))
_WINDOW = _SCANNED.order_by(_D.id).limit(bindparam("n")).subquery("window")
_SCAN = select(func.count(), func.max(_WINDOW.c.id), func.max(_WINDOW.c.received_at))
_IN_WINDOW = and_(_D.id > bindparam("after"), _D.id <= bindparam("high"))

# A task is over for good, as far as its events before `until` go: ended, nothing
# received since (its last delivery, and no delivery of a transaction that committed
# out of order), no stop request queued, or made or finished since, and not pruned
# up to `until` already.
_LATER_DELIVERY = (
    select(literal(1))
    .select_from(_DELIVERIES)
    .where(_D.task_pk == _TASKS.c.id, _D.received_at >= bindparam("until"))
    .exists()
)
_LATER_STOP = (
    select(literal(1))
    .select_from(_STOPS)
    .where(
        _STOPS.c.task_pk == _TASKS.c.id,
        or_(
            _STOPS.c.state == StopState.QUEUED,
            func.coalesce(_STOPS.c.completed_at, _STOPS.c.created_at) >= bindparam("until"),
        ),
    )
    .exists()
)
_PRUNED_ALREADY = (
    select(literal(1))
    .select_from(_PRUNED)
    .where(_PRUNED.c.task_pk == _TASKS.c.id, _PRUNED.c.events_before >= bindparam("until"))
    .exists()
)
_PRUNABLE = (
    select(
        _TASKS.c.id,
        _TASKS.c.runs,
        _TASKS.c.run_start_seen,
        bindparam("until", type_=DateTime()).label("events_before"),
    )
    .where(
        _TASKS.c.id.in_(
            select(_D.task_pk).where(_IN_WINDOW, _D.received_at < bindparam("until"), IS_EVENT)
        ),
        _TASKS.c.status.in_(sorted(ENDED)),
        _TASKS.c.last_delivery_at < bindparam("until"),
        ~_LATER_DELIVERY,
        ~_LATER_STOP,
        ~_PRUNED_ALREADY,
    )
    # PostgreSQL: the foreign key's own lock. It waits for no callback (a task held to
    # refold is skipped), and one that comes to refold waits for the commit.
    .with_for_update(read=True, key_share=True, skip_locked=True)
)


def _mark(dialect: str) -> Any:
    insert = insert_for(dialect)(_PRUNED).from_select(
        ["task_pk", "runs", "start_seen", "events_before"], _PRUNABLE
    )
    # rowcount is not kept for an INSERT unless asked for.
    return insert.on_conflict_do_update(
        index_elements=[_PRUNED.c.task_pk],
        set_={c: insert.excluded[c] for c in ("runs", "start_seen", "events_before")},
    ).execution_options(preserve_rowcount=True)


_MARK = {"sqlite": _mark("sqlite"), "postgresql": _mark("postgresql")}
# Not an event (a duplicate or a rejected request), or an event of a pruned history.
_OF_PRUNED_HISTORY = (
    select(literal(1))
    .select_from(_PRUNED)
    .where(_PRUNED.c.task_pk == _D.task_pk, _PRUNED.c.events_before > _D.received_at)
    .exists()
)
_DELETE = delete(_DELIVERIES).where(
    _IN_WINDOW,
    _D.received_at < bindparam("until"),
    or_(_D.event_key.is_(None), _OF_PRUNED_HISTORY),
)
_DROP_BODIES = (
    update(_DELIVERIES)
    .where(_IN_WINDOW, _D.received_at < bindparam("cutoff"), _D.raw_body.is_not(None))
    .values(raw_body=null())
)


def _rowcount(result: Any) -> int:
    return int(result.rowcount or 0)


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)
