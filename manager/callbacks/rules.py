"""The lifecycle rules of SPEC 3.2: a task's state and runs as a function of its events.

This module is the one home of the ordering rules. It knows neither Flask nor a
database: the webhook, our own stop requests and `manager rebuild` all hand it events
and store what it returns, on every backend.

**Events.** A task's events are its verified, non-duplicate callbacks, whatever
verdict each got on arrival, and the stop requests of ours that ZEGOCLOUD accepted.
Each has a position (Sequence, rank), rank being TranscodeStarted < TranscodeUpdated
< our stop request < transcode_stop (SPEC's 1, 2, 2.5, 3, stored doubled), and a
time: ZEGOCLOUD's Timestamp (for a stop request, when ZEGOCLOUD accepted it). A
missing Sequence counts as 0.

**The fold.** `fold(events)` reads the events in sorted order, by position, so that
the result cannot depend on the order they arrived in, in two passes:

1. Starts, updates, stop requests and stops with StopReason 0 (a user's stop, which
   carries the Sequence of the request it answers), in position order:
   - a TranscodeStarted opens a new run at its Timestamp. If a run begun by a start
     is still open, that run *ended unseen*: its stop callback was lost, and it ends
     where the new one starts, neither stopped nor failed. A run that only an update
     has shown so far takes the start as its own instead (an update without a
     Sequence counts as 0, below the start it follows);
   - a TranscodeUpdated keeps the open run going (and undoes a stop request below
     it); before any run, it opens one at its Timestamp (its start was lost); after
     a stop it changes nothing (only a start begins a new run);
   - a stop request of ours marks the open run as stopping;
   - a stop ends the open run at its Timestamp. With no run yet, it proves one whose
     start is unknown. A run ends once: a later stop of a run already stopped only
     moves its end earlier, to the first stop in time.
   A run never overlaps the next: an end later than the next run's start is cut
   there.
2. Stops with StopReason 1, which ZEGOCLOUD makes on its own and whose Sequence it
   does not document (often 0, below the run it ends), are placed by Timestamp: each
   ends the latest run begun at or before its Timestamp (a run with unknown start
   counts as begun before anything); failing that, the latest run begun at or below
   its Sequence; failing both, it proves a run of its own, the first. It ends an open
   run or one that ended unseen, and ends a stopped run earlier if it came first (in
   the same second too: then the failure is how the run ended).

The task then follows from its last run: `running`, `stopping` when a stop request
came after the run's last start or update, `stopped` or `failed` by how it ended.
Its owner is the UserId of its highest start or update, and every run reports under
that owner. A delivery is `applied` when it changed the task or its runs, `stale` when
it changed neither. Its position is the highest of
its events.

**Extending the fold.** Almost every delivery is newer than everything its task has
seen. `extend` applies such an event to what the task row keeps (its last run and
its registers) by the same steps as `fold`, so the webhook need not read the
task's history. That gives the fold's answer because a newer event touches only
the last run (and may open one), and a StopReason 1 stop already placed by time stays
where it is unless a new run begins no later than it. Where it cannot tell (an event
below the task's position, a start no later than the task's latest failure stop, or
a failure stop older than the last run's start), it returns None, and the caller
folds the whole history.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import IntEnum, StrEnum

from manager.vocabulary import TaskStatus


class Rank(IntEnum):
    """An event's rank at equal Sequence; SPEC's 1, 2, 2.5 and 3, doubled to stay integers."""

    STARTED = 2
    UPDATED = 4
    STOP_REQUEST = 5
    STOPPED = 6


class Ending(StrEnum):
    """How a run ended: by a stop callback (StopReason 0 or 1), or unseen."""

    STOPPED = "stopped"
    FAILED = "failed"
    UNSEEN = "unseen"


ACTIVE = frozenset({TaskStatus.RUNNING, TaskStatus.STOPPING})
ENDED = frozenset({TaskStatus.STOPPED, TaskStatus.FAILED})
STOPPED_BY_USER = 0  # StopReason of a stop someone asked for
FAILED_ON_ITS_OWN = 1  # StopReason of a stop ZEGOCLOUD made after an error
NO_POSITION = (-1, 0)  # below every event's position

Position = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded event of a task."""

    rank: Rank
    sequence: int
    at: datetime
    stop_reason: int | None = None
    user_id: str | None = None

    @property
    def position(self) -> Position:
        return (self.sequence, self.rank)

    @property
    def is_failure(self) -> bool:
        return self.rank == Rank.STOPPED and self.stop_reason == FAILED_ON_ITS_OWN

    def sort_key(self) -> tuple[int, int, int, datetime]:
        # Unique among a task's events: duplicates share (Sequence, rank, StopReason).
        reason = -1 if self.stop_reason is None else self.stop_reason
        return (self.sequence, self.rank, reason, self.at)


@dataclass(frozen=True, slots=True)
class Run:
    """One run: from its start (None: unknown) to its end (None: still going)."""

    started_at: datetime | None
    ended_at: datetime | None = None
    ending: Ending | None = None
    # Begun by a TranscodeStarted; else by an update or a stop, its start lost.
    start_seen: bool = False
    # The Sequence of the event that opened the run: where pass 2 falls back to it.
    start_seq: int = NO_POSITION[0]

    @property
    def stop_reason(self) -> int | None:
        """The run's task_runs.stop_reason: 0 stopped, 1 failed, None open or unseen."""
        return {Ending.STOPPED: STOPPED_BY_USER, Ending.FAILED: FAILED_ON_ITS_OWN}.get(
            self.ending  # type: ignore[arg-type]
        )

    def same_as(self, other: Run) -> bool:
        """Equal as stored (the opening Sequence is not stored)."""
        return (self.started_at, self.ended_at, self.ending) == (
            other.started_at,
            other.ended_at,
            other.ending,
        )


@dataclass(frozen=True, slots=True)
class History:
    """A task as its events make it: its status, registers and runs.

    `runs` holds the runs numbered `first_run + 1` onwards: all of them from `fold`,
    the last one (and any it opened) from `extend`.
    """

    status: TaskStatus
    position: Position
    owner: str | None
    owner_position: Position | None
    last_failure_at: datetime | None
    runs: tuple[Run, ...]
    first_run: int = 0

    @property
    def run_count(self) -> int:
        return self.first_run + len(self.runs)

    @property
    def last_run(self) -> Run | None:
        return self.runs[-1] if self.runs else None


def names_owner(event: Event) -> bool:
    """Only starts and updates name the owner (a stop's UserId is whoever stopped it)."""
    return event.rank in (Rank.STARTED, Rank.UPDATED)


def fold(events: Iterable[Event]) -> History:
    """The task and its runs after these events, in any order they arrived."""
    ordered = sorted(events, key=Event.sort_key)
    walk = _Walk()
    failures = []
    for event in ordered:
        if event.is_failure:
            failures.append(event)
        else:
            walk.step(event)
    for event in failures:
        walk.place_failure(event)
    owner_event = max(filter(names_owner, ordered), key=Event.sort_key, default=None)
    return walk.history(
        position=max((e.position for e in ordered), default=NO_POSITION),
        owner=None if owner_event is None else owner_event.user_id,
        owner_position=None if owner_event is None else owner_event.position,
        last_failure_at=max((e.at for e in failures), default=None),
    )


def extend(history: History, event: Event) -> History | None:
    """`fold` of the history's events plus this one, from the history's last run alone.

    None where only a fold of the whole history can tell: the event is not above every
    event so far, or a StopReason 1 stop is (or would be) placed by its Timestamp in
    a way a newer event can change.
    """
    if event.position <= history.position:
        return None
    last = history.last_run
    if last is not None and last.ending == Ending.FAILED and not last.start_seen:
        # Pass 1 never saw this run closed: a run only a failure proved (start unknown)
        # does not exist there, and one an update opened is open there, to be taken
        # over by a start.
        return None
    if (
        event.rank == Rank.STARTED
        and history.last_failure_at is not None
        and event.at <= history.last_failure_at
    ):
        return None  # the new run may take a failure placed by time from an earlier one
    walk = _Walk(
        runs=[] if last is None else [last],
        first_run=history.first_run if last is None else history.run_count - 1,
        stop_requested=history.status == TaskStatus.STOPPING,
    )
    if event.is_failure:
        if last is not None and last.started_at is not None and event.at < last.started_at:
            return None  # it may belong to an earlier run
        walk.place_failure(event)
    else:
        walk.step(event)
    take_owner = names_owner(event)  # above every event, so above the owner's too
    return walk.history(
        position=event.position,
        owner=event.user_id if take_owner else history.owner,
        owner_position=event.position if take_owner else history.owner_position,
        last_failure_at=_later(history.last_failure_at, event.at if event.is_failure else None),
    )


@dataclass
class _Walk:
    """The runs as pass 1 builds them, and the steps that build them."""

    runs: list[Run] = field(default_factory=list)
    first_run: int = 0
    stop_requested: bool = False

    def _open(self, event: Event) -> None:
        last = self.runs[-1] if self.runs else None
        if last is not None and last.ended_at is not None and last.ended_at > event.at:
            self.runs[-1] = replace(last, ended_at=_end_at(last, event.at))  # no overlap
        self.runs.append(
            Run(
                started_at=event.at,
                start_seen=event.rank == Rank.STARTED,
                start_seq=event.sequence,
            )
        )
        self.stop_requested = False

    def step(self, event: Event) -> None:
        """Pass 1: one start, update, stop request or user's stop, in position order."""
        last = self.runs[-1] if self.runs else None
        is_open = last is not None and last.ending is None
        if event.rank == Rank.STARTED:
            if last is not None and is_open and not last.start_seen:
                # The run an update showed going: this is its start (an update without
                # a Sequence counts as 0, below the start it follows).
                self.runs[-1] = replace(
                    last, started_at=event.at, start_seen=True, start_seq=event.sequence
                )
                self.stop_requested = False
                return
            if last is not None and is_open:
                self.runs[-1] = _ended(last, event.at, Ending.UNSEEN)
            self._open(event)
        elif event.rank == Rank.UPDATED:
            if is_open:
                self.stop_requested = False
            elif last is None:
                self._open(event)  # its start was lost
        elif event.rank == Rank.STOP_REQUEST:
            self.stop_requested = self.stop_requested or is_open
        elif last is None:
            self.runs.append(
                Run(None, event.at, Ending.STOPPED, start_seq=event.sequence)
            )  # a stop whose start never came still proves a run
        elif is_open or (
            last.ended_at is not None and _end_at(last, event.at) < last.ended_at
        ):  # the first stop in time ends a run; a failure keeps a tie (pass 2)
            self.runs[-1] = _ended(last, event.at, Ending.STOPPED)

    def place_failure(self, event: Event) -> None:
        """Pass 2: a StopReason 1 stop ends the run it falls in by Timestamp."""
        index = _latest(i for i, run in enumerate(self.runs) if _begun_by(run, event.at))
        if index is None:
            index = _latest(i for i, run in enumerate(self.runs) if run.start_seq <= event.sequence)
        if index is None:
            self.runs.insert(0, Run(None, event.at, Ending.FAILED, start_seq=event.sequence))
            return
        run = self.runs[index]
        ended_at = event.at
        later = self.runs[index + 1] if index + 1 < len(self.runs) else None
        if later is not None and later.started_at is not None:
            ended_at = min(ended_at, later.started_at)  # no overlap
        ended_at = _end_at(run, ended_at)
        # A failure ends an open run or one that ended unseen, and a stopped one if it
        # came first; in the same second, the failure (a tie rule extend keeps too).
        if run.ending in (None, Ending.UNSEEN) or (
            run.ended_at is not None and ended_at <= run.ended_at
        ):
            self.runs[index] = replace(run, ended_at=ended_at, ending=Ending.FAILED)

    def history(
        self,
        *,
        position: Position,
        owner: str | None,
        owner_position: Position | None,
        last_failure_at: datetime | None,
    ) -> History:
        last = self.runs[-1] if self.runs else None
        if last is None or last.ending is None:
            status = TaskStatus.STOPPING if self.stop_requested else TaskStatus.RUNNING
        elif last.ending == Ending.FAILED:
            status = TaskStatus.FAILED
        else:
            status = TaskStatus.STOPPED
        return History(
            status=status,
            position=position,
            owner=owner,
            owner_position=owner_position,
            last_failure_at=last_failure_at,
            runs=tuple(self.runs),
            first_run=self.first_run,
        )


def _end_at(run: Run, at: datetime) -> datetime:
    """When the run ends if it ends at `at`: not before its start (skewed clocks)."""
    if run.started_at is not None and at < run.started_at:
        return run.started_at
    return at


def _ended(run: Run, at: datetime, ending: Ending) -> Run:
    return replace(run, ended_at=_end_at(run, at), ending=ending)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def _begun_by(run: Run, at: datetime) -> bool:
    return run.started_at is None or run.started_at <= at


def _latest(indexes: Iterable[int]) -> int | None:
    return max(indexes, default=None)
