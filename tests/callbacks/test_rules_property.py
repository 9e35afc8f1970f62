"""Any arrival order of a random lifecycle gives the sorted order's task and runs,
whether folded whole or built up the way the store does it."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from manager.callbacks.rules import Event, Rank, fold

from .lifecycles import Step, lifecycles
from .test_rules import as_row, stored

T = datetime(2026, 12, 1, 12, 0, 0)
RANKS = {
    "start": Rank.STARTED,
    "update": Rank.UPDATED,
    "request": Rank.STOP_REQUEST,
    "stop": Rank.STOPPED,
}


def event(step: Step) -> Event:
    return Event(
        RANKS[step.kind],
        step.sequence,
        T + timedelta(seconds=step.offset),
        stop_reason=step.stop_reason,
        user_id=None if step.kind in ("request", "stop") else "u",
    )


@settings(max_examples=400, deadline=None)
@given(data=st.data(), steps=lifecycles())
def test_every_arrival_order_gives_the_sorted_result(
    data: st.DataObject, steps: list[Step]
) -> None:
    events = list({e.sort_key(): e for e in map(event, steps)}.values())  # as recorded
    expected = fold(sorted(events, key=Event.sort_key))
    order = data.draw(st.permutations(events))
    assert fold(order) == expected
    by_store = stored(list(order))
    assert as_row(by_store) == as_row(expected)
    assert expected.runs
    assert by_store.runs[-1].same_as(expected.runs[-1])
