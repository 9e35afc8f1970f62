"""The lifecycle rules (manager/callbacks/rules.py) on hand-computed lifecycles.

Each case lists a task's events as ZEGOCLOUD and we produced them, and the task and
runs they make. Every case is checked in every arrival order, both by `fold` and the
way the store works (extend the row where it can, else fold the history), so the
table is the rule and order-independence at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from manager.callbacks.rules import (
    Ending,
    Event,
    History,
    Rank,
    Run,
    TaskStatus,
    extend,
    fold,
)

T = datetime(2026, 12, 1, 12, 0, 0)


def at(seconds: int) -> datetime:
    return T + timedelta(seconds=seconds)


def start(seq: int, t: int, user: str = "u") -> Event:
    return Event(Rank.STARTED, seq, at(t), user_id=user)


def update(seq: int, t: int, user: str = "u") -> Event:
    return Event(Rank.UPDATED, seq, at(t), user_id=user)


def stop(seq: int, t: int, reason: int = 0) -> Event:
    return Event(Rank.STOPPED, seq, at(t), stop_reason=reason, user_id="op")


def request(seq: int, t: int) -> Event:
    return Event(Rank.STOP_REQUEST, seq, at(t))


# (started, ended, how) in seconds after T; None for unknown or still going.
RunFigures = tuple[int | None, int | None, str | None]


@dataclass(frozen=True)
class Case:
    events: list[Event]
    status: TaskStatus
    runs: list[RunFigures]
    owner: str | None = "u"


CASES: dict[str, Case] = {
    "a plain lifecycle": Case(
        [start(1, 0), update(2, 5), stop(3, 60)],
        TaskStatus.STOPPED,
        [(0, 60, "stopped")],
    ),
    "the issue's first example: a restart whose stop was lost, then a stop": Case(
        [start(1, 0), start(2, 50), stop(3, 90)],
        TaskStatus.STOPPED,
        [(0, 50, "unseen"), (50, 90, "stopped")],
    ),
    "the issue's second example: a failure with Sequence 0 in the second run": Case(
        [start(1, 0), stop(2, 30), start(3, 60), stop(0, 90, reason=1)],
        TaskStatus.FAILED,
        [(0, 30, "stopped"), (60, 90, "failed")],
    ),
    "two runs": Case(
        [start(1, 0), stop(2, 10), start(3, 20), stop(4, 30)],
        TaskStatus.STOPPED,
        [(0, 10, "stopped"), (20, 30, "stopped")],
    ),
    "a restart whose stop was lost, still running": Case(
        [start(1, 0), update(2, 5), start(3, 40)],
        TaskStatus.RUNNING,
        [(0, 40, "unseen"), (40, None, None)],
    ),
    "a failure with Sequence 0 in the first run, then a restart": Case(
        [start(1, 0), update(2, 10), stop(0, 20, reason=1), start(3, 60)],
        TaskStatus.RUNNING,
        [(0, 20, "failed"), (60, None, None)],
    ),
    "a failure with Sequence 0 in the second run, after an update": Case(
        [start(1, 0), stop(2, 30), start(3, 60), update(4, 70), stop(0, 90, reason=1)],
        TaskStatus.FAILED,
        [(0, 30, "stopped"), (60, 90, "failed")],
    ),
    "a failure with its own Sequence": Case(
        [start(1, 0), update(2, 5), stop(3, 9, reason=1)],
        TaskStatus.FAILED,
        [(0, 9, "failed")],
    ),
    "an update after a stop changes nothing": Case(
        [start(1, 0), stop(2, 30), update(3, 40)],
        TaskStatus.STOPPED,
        [(0, 30, "stopped")],
    ),
    "our stop request between an update and the stop callback": Case(
        [start(1, 0), update(2, 5), request(3, 20), stop(3, 25)],
        TaskStatus.STOPPED,
        [(0, 25, "stopped")],
    ),
    "our stop request accepted, no stop callback yet": Case(
        [start(1, 0), update(2, 5), request(3, 20)],
        TaskStatus.STOPPING,
        [(0, None, None)],
    ),
    "an update above our stop request: running again": Case(
        [start(1, 0), request(2, 20), update(3, 25)],
        TaskStatus.RUNNING,
        [(0, None, None)],
    ),
    "a stop with no start proves a run": Case(
        [stop(3, 30)],
        TaskStatus.STOPPED,
        [(None, 30, "stopped")],
        owner=None,
    ),
    "a failure with no start proves a run": Case(
        [stop(0, 30, reason=1)],
        TaskStatus.FAILED,
        [(None, 30, "failed")],
        owner=None,
    ),
    "a late start fills in the run its stop proved": Case(
        [start(1, 0), stop(3, 30)],
        TaskStatus.STOPPED,
        [(0, 30, "stopped")],
    ),
    "updates without a Sequence belong to the start they follow": Case(
        [start(1, 0), update(0, 5), update(0, 6), stop(2, 30)],
        TaskStatus.STOPPED,
        [(0, 30, "stopped")],
    ),
    "an update whose start was lost opens the run": Case(
        [update(2, 5), stop(3, 30)],
        TaskStatus.STOPPED,
        [(5, 30, "stopped")],
    ),
    "the earliest of two stops ends the run": Case(
        [start(1, 0), stop(2, 30), stop(3, 20)],
        TaskStatus.STOPPED,
        [(0, 20, "stopped")],
    ),
    "a failure before a user's stop ends the run first": Case(
        [start(1, 0), stop(0, 20, reason=1), stop(2, 30)],
        TaskStatus.FAILED,
        [(0, 20, "failed")],
    ),
    "a failure after the run's stop changes nothing": Case(
        [start(1, 0), stop(2, 30), stop(0, 40, reason=1)],
        TaskStatus.STOPPED,
        [(0, 30, "stopped")],
    ),
    "a failure older than every run proves an earlier run": Case(
        [start(5, 100), stop(0, 50, reason=1)],
        TaskStatus.RUNNING,
        [(None, 50, "failed"), (100, None, None)],
    ),
    "a user's stop below the start proves an earlier run": Case(
        [start(5, 100), stop(4, 50)],
        TaskStatus.RUNNING,
        [(None, 50, "stopped"), (100, None, None)],
    ),
    "a failure and a user's stop in the same second: the failure": Case(
        [start(1, 0), stop(0, 60, reason=1), stop(2, 60)],
        TaskStatus.FAILED,
        [(0, 60, "failed")],
    ),
    "a failure proves a run, then an update shows the next": Case(
        [stop(0, 20, reason=1), update(2, 30)],
        TaskStatus.RUNNING,
        [(None, 20, "failed"), (30, None, None)],
    ),
    "an update's run, a failure before it, then its start": Case(
        [update(0, 10), stop(0, 20, reason=1), start(1, 30)],
        TaskStatus.RUNNING,
        [(None, 20, "failed"), (30, None, None)],
    ),
    "skewed clocks: a failure and a stop stamped before the start": Case(
        [start(1, 10), stop(1, 5, reason=1), stop(2, 3)],
        TaskStatus.FAILED,
        [(10, 10, "failed")],
    ),
    "a restart stamped before the run it follows ends that run at its start": Case(
        [start(0, 2), stop(1, 3), start(2, 1)],
        TaskStatus.RUNNING,
        [(2, 2, "stopped"), (1, None, None)],
    ),
    "the owner is the newest start's or update's UserId": Case(
        [start(1, 0, user="a"), update(2, 5, user="b"), stop(3, 9)],
        TaskStatus.STOPPED,
        [(0, 9, "stopped")],
        owner="b",
    ),
}


def figures(history: History) -> list[RunFigures]:
    def seconds(value: datetime | None) -> int | None:
        return None if value is None else int((value - T).total_seconds())

    return [
        (seconds(r.started_at), seconds(r.ended_at), None if r.ending is None else str(r.ending))
        for r in history.runs
    ]


def as_row(history: History) -> History:
    """What the task row keeps of a history: the last run, as lifecycle.history_of reads it
    (which cannot know the Sequence that opened it)."""
    if not history.runs:
        return history
    last = history.runs[-1]
    return History(
        status=history.status,
        position=history.position,
        owner=history.owner,
        owner_position=history.owner_position,
        last_failure_at=history.last_failure_at,
        runs=(Run(last.started_at, last.ended_at, last.ending, start_seen=last.start_seen),),
        first_run=history.run_count - 1,
    )


def stored(arrival: list[Event]) -> History:
    """The history as the store reaches it: extend from the row, else fold everything."""
    history = fold([])
    for i, event in enumerate(arrival):
        extended = extend(as_row(history), event)
        history = fold(arrival[: i + 1]) if extended is None else extended
    return history


@pytest.mark.parametrize("name", sorted(CASES))
def test_rules(name: str) -> None:
    case = CASES[name]
    expected = fold(case.events)
    assert (expected.status, figures(expected), expected.owner) == (
        case.status,
        case.runs,
        case.owner,
    )
    assert expected.run_count == len(case.runs)
    last = expected.last_run
    assert last is not None
    for order in itertools.permutations(case.events):
        assert fold(order) == expected, order
        by_store = stored(list(order))
        assert as_row(by_store) == as_row(expected), order
        assert by_store.runs[-1].same_as(last)


def test_an_ending_is_one_of_three() -> None:
    assert {str(e) for e in Ending} == {"stopped", "failed", "unseen"}
