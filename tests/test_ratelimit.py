"""The shared rate limit: the bound on calls per second, and the slots it hands out."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from manager.db import make_engine
from manager.ratelimit import (
    CLOCK_ERROR,
    HEADROOM,
    SEND_TOLERANCE,
    TRANSIT_ALLOWANCE,
    ClockOffset,
    SharedRateLimiter,
    max_calls_in_window,
    spread_budget,
)
from manager.zego.fake import FakeZego

from .conftest import APP_ID, CALLBACK_SECRET, SERVER_SECRET


def far_end(rate: int) -> FakeZego:
    """The fake's own limit, which enforces ZEGOCLOUD's documented one."""
    return FakeZego(
        app_id=APP_ID, server_secret=SERVER_SECRET, callback_secret=CALLBACK_SECRET, rate_limit=rate
    )


def throttled(rate: int, arrivals: list[float]) -> int:
    fake = far_end(rate)
    for at in sorted(arrivals):
        fake._take_rate_slot(at)
    return fake.throttled


def test_the_budget_shares_add_up() -> None:
    budget = spread_budget(HEADROOM)
    assert budget == pytest.approx(3 / 97)
    assert min(SEND_TOLERANCE, CLOCK_ERROR, TRANSIT_ALLOWANCE) > 0
    assert SEND_TOLERANCE + 2 * CLOCK_ERROR + TRANSIT_ALLOWANCE == pytest.approx(budget)
    assert max_calls_in_window(100, HEADROOM, 0.0) == 97
    assert max_calls_in_window(100, HEADROOM, budget) == 100
    assert max_calls_in_window(100, HEADROOM, budget + 0.001) == 101


@settings(max_examples=150, deadline=None)
@given(
    rate=st.sampled_from([3, 10, 100]),
    headroom=st.sampled_from([HEADROOM, 0.9, 0.98]),
    share=st.floats(0.0, 1.0),
    offset=st.floats(-5.0, 5.0),
    data=st.data(),
)
def test_slots_with_arrivals_spread_within_the_budget_are_never_throttled(
    rate: int, headroom: float, share: float, offset: float, data: st.DataObject
) -> None:
    interval = 1 / (headroom * rate)
    # (A margin of 1e-6 of the budget keeps float rounding out of the exact boundary.)
    spread = share * spread_budget(headroom) * (1 - 1e-6)
    calls = 4 * rate + 1
    # Slots at least `interval` apart (idle gaps when nobody asked), each call arriving
    # anywhere from `offset` to `offset + spread` after its slot, extremes favoured.
    gaps = data.draw(
        st.lists(
            st.one_of(st.just(0.0), st.floats(0.0, 3 * interval)),
            min_size=calls,
            max_size=calls,
        )
    )
    lateness = data.draw(
        st.lists(
            st.one_of(st.sampled_from([0.0, spread]), st.floats(0.0, spread)),
            min_size=calls,
            max_size=calls,
        )
    )
    slots = list(itertools.accumulate(interval + gap for gap in gaps))
    arrivals = [100.0 + offset + slot + late for slot, late in zip(slots, lateness, strict=True)]
    fake = far_end(rate)
    for at in sorted(arrivals):
        fake._take_rate_slot(at)
    assert fake.throttled == 0
    assert fake.max_in_window <= max_calls_in_window(rate, headroom, spread + 1e-9)
    assert max_calls_in_window(rate, headroom, spread) <= rate


def test_a_spread_beyond_the_budget_can_throttle() -> None:
    """The bound is tight: a spread a millisecond over the budget is enough.

    The calls of the first few slots arrive late by the spread, the rest on time,
    so 101 slots spanning 100 intervals (1.031 s) land inside one second.
    """
    rate, interval = 100, 1 / (HEADROOM * 100)
    budget = spread_budget(HEADROOM)
    slots = [i * interval for i in range(rate + 1)]

    def arrivals(spread: float) -> list[float]:
        return [s + spread if s <= slots[-1] - 1 else s for s in slots]

    assert throttled(rate, arrivals(budget * (1 - 1e-6))) == 0
    assert throttled(rate, arrivals(budget + 0.001)) == 1


def test_the_clock_offset_keeps_the_tightest_measurement() -> None:
    clock = ClockOffset()
    clock.update(db_now=1000.010, sent=10.000, received=10.020)  # 20 ms round trip
    assert (clock.offset, clock.error) == (pytest.approx(990.0), pytest.approx(0.010))
    clock.update(db_now=1000.531, sent=10.530, received=10.532)  # 2 ms: better
    assert (clock.offset, clock.error) == (pytest.approx(990.0), pytest.approx(0.001))
    clock.update(db_now=1000.900, sent=10.850, received=10.890)  # 40 ms: ignored
    assert clock.error == pytest.approx(0.001)
    # An old measurement loses trust with time, so a worse but fresh one replaces it.
    assert clock.current_error(100.532) > 0.010
    clock.update(db_now=1090.600, sent=100.590, received=100.610)
    assert (clock.offset, clock.error) == (pytest.approx(990.0), pytest.approx(0.010))


@pytest.fixture
def engines(app: object, database_url: str) -> Iterator[list[Engine]]:
    """Two engines, as two processes would have; `app` empties rate_limiters afterwards."""
    made = [make_engine(database_url) for _ in range(2)]
    yield made
    for engine in made:
        engine.dispose()


def test_slots_of_several_processes_keep_the_interval(engines: list[Engine]) -> None:
    limiters = [SharedRateLimiter(engine, "zego_api", 100) for engine in engines]
    taken: list[tuple[float, float]] = []  # (slot on this host's clock, its error bound)
    for round_ in range(6):
        for limiter in limiters:
            slots = limiter.reserve_many(1 + round_ % 3, max_wait=60)
            assert slots is not None
            error = limiter.clock_error()
            assert error <= CLOCK_ERROR
            taken += [(slot, error) for slot in slots]
    taken.sort()
    interval = limiters[0].interval
    assert interval == pytest.approx(1 / 97)
    for (a, error_a), (b, error_b) in itertools.pairwise(taken):
        # Each process places database-time slots on its own clock within clock_error().
        assert b - a >= interval - error_a - error_b


def test_no_slot_further_ahead_than_max_wait(engines: list[Engine]) -> None:
    limiter = SharedRateLimiter(engines[0], "zego_api", 100)
    assert limiter.reserve_many(500, max_wait=60) is not None  # about 5 s of slots
    assert limiter.reserve(max_wait=1.0) is None
    other = SharedRateLimiter(engines[1], "zego_api", 100)
    assert other.reserve(max_wait=1.0) is None
    later = other.reserve(max_wait=60)
    assert later is not None
