"""The shared rate limit: the bound on calls per second, under leases, hand-overs and pauses.

The property test drives several RateShares over one database with simulated time:
each process's monotonic clock runs at its own offset and drift, every clock read
lets time pass (database round trips, a busy host), calls are written to the socket
some time after their unit was checked out (a slow connect, a paused thread) and
reach the far end within TRANSIT_SPREAD of their write. The far end is the fake
ZEGOCLOUD's own counter: no one-second window may hold more than `rate` calls.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select

from manager.db import make_engine
from manager.migrate import upgrade
from manager.models import RateUnit
from manager.stops import ratelimit
from manager.stops.ratelimit import (
    DRIFT,
    LEASE,
    MAX_UNITS,
    SPACING,
    TRANSIT_SPREAD,
    Grant,
    RateShare,
    unit_calls,
)
from manager.zego.fake import FakeZego

from ..conftest import APP_ID, CALLBACK_SECRET, SERVER_SECRET


def throttled(rate: int, arrivals: list[float]) -> int:
    """How many of the calls the fake ZEGOCLOUD, limited to `rate`, would refuse."""
    fake = FakeZego(
        app_id=APP_ID, server_secret=SERVER_SECRET, callback_secret=CALLBACK_SECRET, rate_limit=rate
    )
    for at in sorted(arrivals):
        fake._take_rate_slot(at)
    return fake.throttled


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path_factory.mktemp('rate') / 'rate.db'}")
    upgrade(made)
    yield made
    made.dispose()


@pytest.mark.parametrize("rate", [1, 7, 100, 101, 250, 100_000])
def test_units_share_the_rate_exactly(rate: int) -> None:
    calls = unit_calls(rate)
    assert sum(calls) == rate
    assert len(calls) == min(rate, MAX_UNITS)
    assert max(calls) - min(calls) <= 1


def test_the_spacing_leaves_one_second_after_drift_and_transit() -> None:
    assert SPACING / (1 + DRIFT) - TRANSIT_SPREAD == pytest.approx(1.0)
    assert 100 / SPACING > 97  # what the units give at the documented rate


# -- the simulation ----------------------------------------------------------------------


@dataclass
class World:
    """True time, advanced a little (or a lot) whenever anyone reads a clock."""

    rng: random.Random
    now: float = 1_000.0
    max_step: float = 0.05

    def tick(self) -> float:
        if self.rng.random() < 0.5:
            self.now += self.rng.uniform(0, self.max_step)
        return self.now


@dataclass
class Process:
    share: RateShare
    clock: Callable[[], float]
    in_flight: list[Grant] = field(default_factory=list)


def make_process(engine: Engine, world: World, rate: int, offset: float, drift: float) -> Process:
    def local() -> float:
        return offset + (1 + drift) * world.tick()

    share = RateShare(engine, "sim", rate, clock=local, db_clock=world.tick)
    return Process(share, local)


# Sends, leases and returns most often, so that hand-overs come within a second of a call.
ACTIONS = ["send"] * 4 + ["acquire"] * 2 + ["release"] * 2 + ["start", "write", "renew", "sleep"]
ACTIONS += ["pause"]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rate=st.sampled_from([1, 3, 10]),
    processes=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    drifts=st.lists(st.sampled_from([-DRIFT, 0.0, DRIFT]), min_size=3, max_size=3),
    actions=st.lists(st.sampled_from(ACTIONS), min_size=50, max_size=400),
)
def test_no_second_ever_holds_more_than_the_rate(
    engine: Engine,
    rate: int,
    processes: int,
    seed: int,
    drifts: list[float],
    actions: list[str],
) -> None:
    with engine.begin() as conn:
        conn.execute(delete(RateUnit))
    rng = random.Random(seed)
    world = World(rng)
    procs = [
        make_process(engine, world, rate, rng.uniform(-1e4, 1e4), drifts[i])
        for i in range(processes)
    ]
    arrivals: list[float] = []
    for action in actions:
        proc = rng.choice(procs)
        share = proc.share
        if action == "acquire":
            share.acquire(rng.randint(1, rate))
        elif action == "renew":
            share.renew()
        elif action == "release":
            share.release(idle_for=rng.choice([0.0, 0.5]))
        elif action in ("start", "send"):  # a sender takes a unit; "start" writes later
            grant = share.try_checkout()
            if grant is not None:
                proc.in_flight.append(grant)
        if action in ("write", "send") and proc.in_flight:
            grant = proc.in_flight.pop(rng.randrange(len(proc.in_flight)))
            if proc.clock() >= grant.deadline:  # the guard: the lease ran out first
                share.finish(grant, None)
                continue
            transit = rng.choice([0.0, TRANSIT_SPREAD, rng.uniform(0, TRANSIT_SPREAD)])
            arrivals.append(world.now + transit)
            share.finish(grant, proc.clock())  # stamped after the last byte left
        elif action == "sleep":
            world.now += rng.choice([0.1, 0.5, SPACING, rng.uniform(0, 2)])
        elif action == "pause":  # a stalled host: past a lease
            world.now += rng.uniform(LEASE / 2, 2 * LEASE)
    assert throttled(rate, arrivals) == 0


def test_the_simulation_finds_a_spacing_too_short(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same simulation, run with less than a second between a unit's calls, sees
    the far end throttle: the property above is not vacuous."""
    monkeypatch.setattr(ratelimit, "SPACING", 0.9)
    with engine.begin() as conn:
        conn.execute(delete(RateUnit))
    world = World(random.Random(3), max_step=0.0)
    proc = make_process(engine, world, 2, 0.0, 0.0)
    assert proc.share.acquire(2) == 2
    arrivals = []
    for _ in range(200):
        if proc.share.renew_due():
            proc.share.renew()
        grant = proc.share.try_checkout()
        if grant is None:
            world.now += 0.05
            continue
        arrivals.append(world.now)
        proc.share.finish(grant, proc.clock())
    assert len(arrivals) > 10
    assert throttled(2, arrivals) > 0


# -- the real database clock ---------------------------------------------------------------


def test_a_unit_paces_its_calls_spacing_apart(engine: Engine) -> None:
    share = RateShare(engine, "pace", 2)
    assert share.acquire(5) == 2
    first = share.try_checkout()
    assert first is not None
    assert share.try_checkout() is None  # the process spreads its calls out
    second = share.checkout(time.monotonic() + SPACING)
    assert second is not None
    assert second.unit != first.unit
    sent = time.monotonic()
    share.finish(first, sent)
    share.finish(second, sent)
    grant = share.checkout(time.monotonic() + 2 * SPACING)
    assert grant is not None
    assert time.monotonic() - sent >= SPACING
    share.finish(grant, None)
    share.release()


def test_a_unit_given_back_waits_for_its_last_call_before_another_holder(engine: Engine) -> None:
    first, second = RateShare(engine, "handover", 1), RateShare(engine, "handover", 1)
    assert first.acquire(1) == 1
    grant = first.try_checkout()
    assert grant is not None
    sent = time.monotonic()
    first.finish(grant, sent)
    assert second.acquire(1) == 0  # leased to the first
    assert first.release() == 1
    assert second.acquire(1) == 1
    assert second.try_checkout() is None  # the first's call is still in the window
    grant = second.checkout(time.monotonic() + 2 * SPACING)
    assert grant is not None
    assert time.monotonic() - sent >= SPACING
    second.finish(grant, None)
    second.release()


def test_a_lapsed_lease_passes_on_only_after_its_window(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "LEASE", 0.3)
    crashed, next_holder = RateShare(engine, "lapse", 1), RateShare(engine, "lapse", 1)
    assert crashed.acquire(1) == 1  # and never gives it back
    monkeypatch.setattr(ratelimit, "LEASE", LEASE)
    taken = time.monotonic()
    while next_holder.acquire(1) == 0:
        time.sleep(0.02)
    assert time.monotonic() - taken >= 0.3 * (1 - DRIFT) - 0.02
    grant = next_holder.checkout(time.monotonic() + 2 * SPACING)
    assert grant is not None
    # The crashed holder could have written until its lease ended.
    assert time.monotonic() - taken >= 0.3 + SPACING - 0.02
    assert crashed.try_checkout() is None  # its own lease has run out here too
    with engine.connect() as conn:
        holder = conn.execute(
            select(RateUnit.holder).where(RateUnit.limiter == "lapse:1")
        ).scalar_one()
    assert holder == next_holder.holder
    assert crashed.renew() == 0  # and renewing finds it taken
    next_holder.finish(grant, None)
    next_holder.release()
