"""A rate limit shared by every process: slots reserved with one atomic UPDATE.

Each call reserves the next free send time in `rate_limiters` and waits for it.
Slots are handed out at least `interval` apart, whichever processes take them,
and times come from the database's clock, so the hosts' clocks need not agree.

The bound. Say every call reaches ZEGOCLOUD between L and L + D seconds after its
slot, for some L. The calls it counts in any one-second window then come from
slots inside a window of 1 + D seconds, and slots `interval` apart fill such a
window with at most ceil((1 + D) / interval) of them (`max_calls_in_window`). At
`interval = 1 / (HEADROOM * rate)` that is at most `rate` whenever
D <= 1 / HEADROOM - 1 (`spread_budget`): 30.9 ms at HEADROOM 0.97, whatever the
rate. D is the sum of three spreads, each with its share of the budget:

- clock: a slot is in database time and turned into this process's monotonic
  time with an offset measured on the reservations themselves; the error is at
  most half the round trip of the best recent measurement (CLOCK_ERROR caps it);
- send: a call goes at or after its slot, and one that would leave more than
  SEND_TOLERANCE late takes a fresh slot instead (dispatch.py);
- transit: from our send to the far end counting the call: the network, and the
  far end's own scheduling (TRANSIT_ALLOWANCE, what is left of the budget).

A call that misses its slot leaves that slot empty, which costs rate but never
the limit; a bunch of calls is what the limit punishes, so lateness is bounded
rather than avoided.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select, text

from .models import RateLimiter
from .sqlutil import insert_ignore_core

# Pace a little below the limit: the 3 % gap buys the 30.9 ms spread budget above,
# and leaves 97 calls/s, above the 95/s a bulk stop must sustain.
HEADROOM = 0.97
# How late after its slot a call may still leave; a later one takes a fresh slot,
# which costs about 10 ms of rate. Measured on the 2-core bench host at load
# average 2-3 (bench/stops.py, 5,000 calls from sender processes): 99 % leave
# within 3-8 ms of their slots, the worst 10.4 ms, so at 10 ms a run of 1,000
# misses 0-2 slots. (Sender threads sharing a process with the database work
# missed 37 in a run at load 4: see worker.ProcessSenders.)
SEND_TOLERANCE = 0.010
# The error allowed in placing a database-time slot on this host's clock. The
# offset is measured again when its bound passes half of this (a round trip of
# a millisecond or two on a quiet database); a process whose bound still exceeds
# it narrows its send window by the excess on both sides (Dispatcher.send_window).
# Measured: at most 1.1 ms. It counts twice in the spread: two processes may err
# in opposite directions.
CLOCK_ERROR = 0.002
# What is left for the network and the far end's own handling until it counts a
# call: 30.9 - 10 - 2 x 2 = 16.9 ms. Measured against the fake on the same host:
# 99 % within 5-7 ms, the worst 6-17 ms, once 27 ms; the whole spread, slot to
# count, was 10-21 ms in five runs and once 31 ms: that 27 ms pause at the far
# end, which no sender can prevent (it still saw at most 99 calls in a second).


def spread_budget(headroom: float = HEADROOM) -> float:
    """The largest arrival spread D (seconds) that can never put `rate` + 1 calls in a second."""
    return 1.0 / headroom - 1.0


def max_calls_in_window(rate: int, headroom: float, spread: float, window: float = 1.0) -> int:
    """The most arrivals any half-open `window` can hold, slots at 1/(headroom*rate), spread D."""
    # A tiny relative epsilon keeps exact multiples (1.0 / interval) from rounding up.
    return math.ceil((window + spread) * headroom * rate * (1 - 1e-12))


TRANSIT_ALLOWANCE = spread_budget() - SEND_TOLERANCE - 2 * CLOCK_ERROR

_NOW = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}
_GREATEST = {"postgresql": "GREATEST", "sqlite": "MAX"}
# How finely each database tells the time (SQLite's 'now' is in whole milliseconds).
_RESOLUTION = {"postgresql": 1e-6, "sqlite": 1e-3}
# How fast this host's monotonic clock may drift from the database's clock
# (NTP slews at most 500 ppm): an old offset measurement loses this much trust a second.
DRIFT = 0.0005


@dataclass
class ClockOffset:
    """Database time minus local monotonic time, from the tightest recent measurement.

    A reservation is one round trip: the database read its clock somewhere between
    our send and our receipt, so `db_now - midpoint` errs by at most half the round
    trip. The best measurement wins, its error growing with age at DRIFT.
    """

    resolution: float = 0.0
    offset: float = 0.0
    error: float = math.inf
    measured_at: float = -math.inf

    def current_error(self, now: float) -> float:
        return self.error + DRIFT * max(0.0, now - self.measured_at)

    def update(self, db_now: float, sent: float, received: float) -> None:
        error = (received - sent) / 2 + self.resolution
        if error <= self.current_error(received):
            self.offset = db_now - (sent + received) / 2
            self.error = error
            self.measured_at = received


class SharedRateLimiter:
    def __init__(
        self,
        engine: Engine,
        name: str,
        rate: int,
        *,
        headroom: float = HEADROOM,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self.name = name
        self.rate = rate
        self.interval = 1.0 / (rate * headroom)
        self._monotonic = monotonic
        dialect = engine.dialect.name
        self._clock = ClockOffset(resolution=_RESOLUTION[dialect])
        self._lock = threading.Lock()
        now, greatest = _NOW[dialect], _GREATEST[dialect]
        # Only per-dialect constants are formatted in; every value is a bound parameter.
        sql = " ".join(
            [
                f"UPDATE rate_limiters SET next_slot = {greatest}(next_slot, {now}) + :span",  # noqa: S608
                f"WHERE name = :name AND next_slot <= {now} + :max_wait",
                f"RETURNING next_slot - :span, {now}",
            ]
        )
        self._reserve = text(sql)
        self._now = text(f"SELECT {now}")  # noqa: S608

    def reserve(self, max_wait: float) -> float | None:
        """The monotonic time at which the reserved call may go; None if beyond max_wait."""
        slots = self.reserve_many(1, max_wait)
        return None if slots is None else slots[0]

    def reserve_many(self, count: int, max_wait: float) -> list[float] | None:
        """Reserve `count` consecutive slots in one statement: their local monotonic times.

        None when the first free slot lies more than max_wait ahead.
        """
        params = {"span": count * self.interval, "name": self.name, "max_wait": max_wait}
        with self._engine.begin() as conn:
            self._measure_clock(conn)
            sent = self._monotonic()
            row = conn.execute(self._reserve, params).first()
            received = self._monotonic()
            if row is None:
                # Either the slots are taken too far ahead, or this is the limiter's first
                # use: create its row (or wait for whoever is creating it) and ask again.
                if not self._exists(conn):
                    insert_ignore_core(
                        conn, RateLimiter, {"name": self.name, "next_slot": 0.0}, ["name"]
                    )
                sent = self._monotonic()
                row = conn.execute(self._reserve, params).first()
                received = self._monotonic()
        if row is None:
            return None
        first, db_now = float(row[0]), float(row[1])
        with self._lock:
            self._clock.update(db_now, sent, received)
            offset = self._clock.offset
        return [first + i * self.interval - offset for i in range(count)]

    def clock_error(self) -> float:
        """The current bound on this process's error in placing a slot, in seconds."""
        with self._lock:
            return self._clock.current_error(self._monotonic())

    def _measure_clock(self, conn: Connection) -> None:
        """Read the database clock until the offset is known to within CLOCK_ERROR.

        Cheap once known: one SELECT only when the best measurement has aged or is poor.
        """
        for _ in range(5):
            with self._lock:
                if self._clock.current_error(self._monotonic()) <= CLOCK_ERROR / 2:
                    return
            sent = self._monotonic()
            db_now = float(conn.execute(self._now).scalar_one())
            received = self._monotonic()
            with self._lock:
                self._clock.update(db_now, sent, received)

    def _exists(self, conn: Connection) -> bool:
        query = select(RateLimiter.name).where(RateLimiter.name == self.name)
        return conn.execute(query).first() is not None
