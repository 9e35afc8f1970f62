"""A task's history as the rules see it, read from its row and its recorded events.

The glue between the pure rules (manager/callbacks/rules.py) and the tables, for
every path that moves a task: a `tasks` row as a `TaskState`, the part of the fold it
keeps as a `History` (`history_of`), a callback, a recorded delivery or an accepted
stop as an `Event`, and the `Change` an event makes. `advance` extends the row alone
where `rules.extend` can tell (`extended`); otherwise it reads the task's recorded
events back (`load_events`) and compares their whole `fold` with what is stored
(`refold`, `compare`, `diff`). A task whose old events were pruned
(manager/callbacks/retention.py) is folded from the run that stands in for them
(`fold_pruned`). Writing a change back is manager/callbacks/task_rows.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, select

from manager.callbacks.rules import (
    ENDED,
    FAILED_ON_ITS_OWN,
    STOPPED_BY_USER,
    Ending,
    Event,
    History,
    Rank,
    Run,
    TaskStatus,
    extend,
    fold,
)
from manager.models import Delivery, PrunedHistory, StopAttempt, StopRequest, Task, TaskRun
from manager.zego.callbacks import STATUS_STARTED, Callback
from manager.zego.client import Outcome

# The Sequence of the events that stand in for a pruned history: below every real one
# (a missing Sequence counts as 0).
BASE_SEQUENCE = -1


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
    # Read for the outbound events (manager/callbacks/outbound.py), which carry the
    # task's snapshot; only `version` is written back with the fold's columns.
    app_id: int
    task_id: str
    input: Any
    outputs: Any
    version: int


@dataclass(frozen=True)
class Mark:
    """A task's pruned_histories row: run `runs` stands in for the events before."""

    runs: int
    start_seen: bool
    events_before: datetime

    def keeps(self, at: datetime) -> bool:
        """Whether an event received (or a stop accepted) at `at` is still recorded."""
        return at >= self.events_before


@dataclass(frozen=True)
class Change:
    """What an event did to its task: its history after, and the runs to write."""

    history: History
    changed: bool
    runs: list[tuple[int, Run]]  # (run_no, run) to insert or replace
    owner_changed: bool
    full: bool  # refolded: runs above history.run_count are to be deleted
    # A run that had ended changed (its times or how it ended), or went: the history
    # already told is not what it was (the outbound events say so: task.revised).
    rewrote: bool = False


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
        return refold(conn, task, None if stored else event)
    return extended(before, after)


def refold(conn: Connection, task: TaskState, event: Event | None = None) -> Change:
    """A whole fold of the task's recorded events, and `event` (not recorded yet); of a
    pruned task, of the events since, after the run that stands in for the rest."""
    row = conn.execute(_PRUNED_OF, {"task_pk": task.id}).first()
    mark = None if row is None else Mark(*row)
    events = load_events(conn, task.id, mark)
    if event is not None:
        events.append(event)
    if mark is None:
        return compare(conn, task, fold(events))
    stored = conn.execute(_RUNS_OF, {"task_pk": task.id}).all()
    return fold_pruned(task, stored, events, mark)


def extended(before: History, after: History) -> Change:
    """What `extend` did to a task: the runs it changed or opened, and whether anything."""
    runs = [
        (after.first_run + i + 1, run)
        for i, run in enumerate(after.runs)
        if after.first_run + i >= before.run_count or not run.same_as(before.runs[-1])
    ]
    owner_changed = after.owner != before.owner
    changed = bool(runs) or owner_changed or _task_fields(after) != _task_fields(before)
    last = before.last_run
    rewrote = (
        last is not None
        and last.ended_at is not None
        and any(number == before.run_count for number, _ in runs)
    )
    return Change(after, changed, runs, owner_changed, full=False, rewrote=rewrote)


def compare(conn: Connection, task: TaskState, after: History) -> Change:
    """A whole fold against what is stored: the runs that differ, and whether anything does."""
    return diff(task, conn.execute(_RUNS_OF, {"task_pk": task.id}).all(), after)


def diff(task: TaskState, stored: Sequence[Any], after: History) -> Change:
    """A whole fold against the task's row and its stored runs (rows of run_no, owner,
    started_at, ended_at, stop_reason, in run_no order)."""
    runs = []
    rewrote = len(stored) > after.run_count
    for number, run in enumerate(after.runs, start=1):
        old = stored[number - 1] if number <= len(stored) else None
        if old is None or old.owner != after.owner or not run.same_as(stored_run(old)):
            runs.append((number, run))
        if old is not None and old.ended_at is not None and not run.same_as(stored_run(old)):
            rewrote = True
    before = history_of(task)
    changed = (
        bool(runs)
        or len(stored) != after.run_count
        or after.owner != before.owner
        or _task_fields(after) != _task_fields(before)
    )
    return Change(after, changed, runs, owner_changed=False, full=True, rewrote=rewrote)


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


def load_events(conn: Connection, task_pk: int, mark: Mark | None = None) -> list[Event]:
    """The task's recorded events: non-duplicate verified callbacks, accepted stops;
    of a pruned task (its `mark`), only those the pruning kept."""
    events = [
        delivery_event(row)
        for row in conn.execute(_EVENTS_OF, {"task_pk": task_pk})
        if mark is None or mark.keeps(row.received_at)
    ]
    events.extend(
        accepted_stop_event(row)
        for row in conn.execute(_ACCEPTED_STOPS_OF, {"task_pk": task_pk})
        if mark is None or mark.keeps(row.attempted_at)
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


# --- a pruned history in the fold (manager/callbacks/retention.py) ------------------


def base_events(run: Run) -> list[Event]:
    """The events that stand in for a pruned history: its last run's start (if known;
    an update if its start was not seen) and its stop or failure, at Sequence -1."""
    events = []
    if run.started_at is not None:
        rank = Rank.STARTED if run.start_seen else Rank.UPDATED
        events.append(Event(rank, BASE_SEQUENCE, run.started_at))
    if run.ended_at is not None:
        reason = FAILED_ON_ITS_OWN if run.ending == Ending.FAILED else STOPPED_BY_USER
        events.append(Event(Rank.STOPPED, BASE_SEQUENCE, run.ended_at, stop_reason=reason))
    return events


def fold_pruned(
    task: TaskState, stored: Sequence[Any], events: Iterable[Event], mark: Mark
) -> Change:
    """A pruned task refolded: run `mark.runs` as stored stands in for its deleted
    events, `events` (those received since) follow it, and the row's max-registers
    keep what the deleted ones gave them. `stored` are its runs (rows of run_no, owner,
    started_at, ended_at, stop_reason, in run_no order)."""
    offset = mark.runs - 1
    if offset < 0 or len(stored) <= offset:  # its runs are not what pruning left
        return Change(history_of(task), False, [], owner_changed=False, full=False)
    base = replace(stored_run(stored[offset]), start_seen=mark.start_seen)
    after = _with_registers_of(task, fold([*base_events(base), *events]))
    # Compared from run `mark.runs` on, as if it were the first; then numbered.
    change = diff(replace(task, runs=task.runs - offset), stored[offset:], after)
    owner_changed = any(row.owner != after.owner for row in stored[:offset])
    return Change(
        replace(change.history, first_run=offset),
        change.changed or owner_changed,
        [(number + offset, run) for number, run in change.runs],
        owner_changed=owner_changed,
        full=True,
        rewrote=change.rewrote,
    )


def _with_registers_of(task: TaskState, after: History) -> History:
    """The fold's max-registers, with what the row's hold from the pruned events."""
    position = max(after.position, (task.state_seq, task.state_rank))
    owner, owner_position = after.owner, after.owner_position
    if owner_position is not None and owner_position[0] == BASE_SEQUENCE:
        owner, owner_position = None, None  # the base's start names no owner
    if task.owner_seq is not None and task.owner_rank is not None:
        kept = (task.owner_seq, task.owner_rank)
        if owner_position is None or kept > owner_position:
            owner, owner_position = task.owner, kept
    failures = [t for t in (after.last_failure_at, task.last_failure_at) if t is not None]
    return replace(
        after,
        position=position,
        owner=owner,
        owner_position=owner_position,
        last_failure_at=max(failures, default=None),
    )


# --- statements, built once ---------------------------------------------------------

STATE_FIELDS = tuple(f.name for f in fields(TaskState))
_TASKS = cast(Table, Task.__table__)
_DELIVERIES = cast(Table, Delivery.__table__)
_RUNS = cast(Table, TaskRun.__table__)

TASK_STATE = select(*(_TASKS.c[name] for name in STATE_FIELDS))
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
_EVENTS_OF = select(*EVENT_COLUMNS, _DELIVERIES.c.received_at).where(
    _DELIVERIES.c.task_pk == bindparam("task_pk"), IS_EVENT
)
_PRUNED_OF = select(
    PrunedHistory.runs, PrunedHistory.start_seen, PrunedHistory.events_before
).where(PrunedHistory.task_pk == bindparam("task_pk"))
ACCEPTED_STOP_COLUMNS = (StopRequest.task_pk, StopAttempt.sequence, StopAttempt.attempted_at)
ACCEPTED_STOPS = (
    select(*ACCEPTED_STOP_COLUMNS)
    .join(StopRequest, StopRequest.id == StopAttempt.stop_request_id)
    .where(StopAttempt.outcome == Outcome.SUCCESS)
)
_ACCEPTED_STOPS_OF = ACCEPTED_STOPS.where(StopRequest.task_pk == bindparam("task_pk"))
