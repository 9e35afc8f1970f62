"""A rate limit shared by every process: units of the rate, leased from the database, paced locally.

The limit, `rate` calls in any one-second window as ZEGOCLOUD counts them, is cut
into units (rows of `rate_units`), unit k allowing `calls_k` calls, which add up
to `rate` (one call each up to 100 units). A process leases the units it needs for
LEASE seconds, renews them ahead of expiry while it has work, and gives them back
when idle. It paces its calls on its own monotonic clock; no timing depends on a
remote clock or on how far away the database is, which only delays the leases.

The bound. Every call is stamped on the local monotonic clock once its last byte
has been written (zego/guard.py), and a unit's next call may start writing only
SPACING after the stamp of the `calls`-th call before it on that unit. Say each
call is counted by ZEGOCLOUD between L and L + TRANSIT_SPREAD after it was written,
for some L. Then on each unit the `calls`-th next call is counted at least
SPACING / (1 + DRIFT) - TRANSIT_SPREAD = 1 second later, so a one-second window
holds at most `calls_k` of a unit's calls, and at most `rate` in all. Across
holders the database keeps the order: a unit passes to another process only once
its holder gave it back (stating when its last call's window ends, on the
database's clock: `free_at`) or its lease ran out (its holder stopped writing
before `lease_until`, so the window ends at `lease_until + SPACING`); the new
holder's first call waits for that. Conversions between the clocks only ever
err late: a lease is taken to end LEASE after we sent the statement that took it
(the database read its clock later), and a wait is counted from when its answer
arrived (after the database read its clock).

What it costs: each unit gives calls_k / SPACING per second, so all of them
give `rate` / 1.0256: 97.5 calls/s at 100. A holder that crashes keeps its units
out of use for LEASE + SPACING at most.
"""

from __future__ import annotations

import itertools
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, bindparam, text

from manager.models import RateUnit
from manager.sqlutil import insert_ignore_rows

# How much later than its write ZEGOCLOUD may count one call than another: the
# network's jitter and the far end's own scheduling. Measured against the fake on
# the 2-core bench host (bench/stops.py), write to count: 99 % within 2 ms, the
# worst under 20 ms with the host fully loaded.
TRANSIT_SPREAD = 0.025
# How fast a monotonic clock may run against true time (NTP slews at most 500 ppm).
DRIFT = 0.0005
# Local seconds between a unit's call and its `calls`-th successor: one true second
# plus the spread, on a clock that may run fast by DRIFT.
SPACING = (1.0 + TRANSIT_SPREAD) * (1.0 + DRIFT)
# How long a unit is leased for, and how much of the lease may be left before it is
# renewed: renewals go out at least 2.5 s ahead, far more than a slow database takes.
LEASE = 5.0
RENEW_AHEAD = 2.5
# Taken off the local end of a lease: the database's clock resolution (SQLite's is
# a millisecond) and the drift over a lease, with room to spare.
LEASE_MARGIN = 0.01
MAX_UNITS = 100
# A process starts its calls at least this share of their average interval apart
# (SPACING / the calls its units allow). Not needed for the bound: it keeps units
# taken together from firing together, since a burst waits in the far end's queue
# and is counted late, which eats into TRANSIT_SPREAD.
SMOOTHING = 0.5
_LEASES = itertools.count(1)

_NOW = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}
_GREATEST = {"postgresql": "GREATEST", "sqlite": "MAX"}
# A unit's free_at may be no earlier than this after the database read its clock,
# whose reading may lag the true time by its resolution.
_RESOLUTION = {"postgresql": 1e-6, "sqlite": 1e-3}


def unit_calls(rate: int) -> list[int]:
    """How many calls per second each unit of `rate` allows: `rate` units of one, up to
    MAX_UNITS; above that MAX_UNITS units sharing the rate as evenly as whole calls can."""
    units = min(rate, MAX_UNITS)
    base, extra = divmod(rate, units)
    return [base + 1 if k < extra else base for k in range(units)]


@dataclass
class Unit:
    """A leased unit as its holder keeps it; times are on the holder's monotonic clock."""

    number: int
    calls: int
    lease_end: float  # no call on this unit may start writing at or after it
    not_before: float  # the previous holder's calls have left the window by then
    sent: deque[float] = field(default_factory=deque)  # stamps of its latest `calls` calls
    busy: bool = False  # checked out for a call that has not been stamped yet
    used_at: float = -math.inf
    # Which lease of the unit this is: a grant from a lease that lapsed (and was taken
    # again) must not check in the new one.
    lease_no: int = field(default_factory=lambda: next(_LEASES))

    def ready_at(self) -> float:
        """When the unit may start its next call (ignoring its lease)."""
        if len(self.sent) < self.calls:
            return self.not_before
        return max(self.not_before, self.sent[0] + SPACING)

    def clear_at(self) -> float:
        """When every call of this holder has left the window: another holder's first may go."""
        return max(self.not_before, self.sent[-1] + SPACING if self.sent else -math.inf)

    def usable(self, now: float) -> bool:
        return not self.busy and self.ready_at() <= now < self.lease_end


@dataclass(frozen=True)
class Grant:
    """A unit checked out for one call: the call must start writing before `deadline`."""

    unit: int
    deadline: float
    lease_no: int = 0


class RateShare:
    """This process's share of the limit: the units it holds, and their pacing.

    Thread-safe: sender threads check units out and in, while one thread at a time
    acquires, renews and releases them (one statement each).
    """

    def __init__(
        self,
        engine: Engine,
        name: str,
        rate: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        db_clock: Callable[[], float] | None = None,
    ) -> None:
        self._engine = engine
        # Units are cut per rate: processes configured with different rates use
        # different units (so change ZEGO_RATE_LIMIT on every process at once).
        self.limiter = f"{name}:{rate}"
        self.rate = rate
        # A new holder per share, never a process name: a restarted container has the
        # same host name and pid, but not its predecessor's record of when it sent.
        self.holder = secrets.token_hex(8)
        self._clock = clock
        self._units: dict[int, Unit] = {}
        self._last_start = -math.inf
        self._changed = threading.Condition()
        self._rows_exist = False
        dialect = engine.dialect.name
        self._resolution = _RESOLUTION[dialect]
        # Simulations give the database's clock as a parameter; the service never does.
        self._db_clock = db_clock
        now = ":db_now" if db_clock is not None else _NOW[dialect]
        greatest = _GREATEST[dialect]
        skip_locked = " FOR UPDATE SKIP LOCKED" if dialect == "postgresql" else ""
        free = f"(holder IS NULL OR lease_until < {now})"
        # After a lapsed lease its holder may have written until lease_until.
        effective_free_at = (
            f"CASE WHEN holder IS NULL THEN free_at "
            f"ELSE {greatest}(free_at, lease_until + :spacing) END"
        )
        # Only per-dialect constants are formatted in; every value is a bound parameter.
        # The pick is a CTE, run once: as an IN (subquery) PostgreSQL may run it again
        # for every row (clock_timestamp() is volatile), taking far more than `count`.
        self._acquire = text(
            f"""WITH pick AS (
                SELECT unit FROM rate_units WHERE limiter = :limiter AND {free}
                ORDER BY {effective_free_at}, unit LIMIT :count{skip_locked})
            UPDATE rate_units SET holder = :holder, lease_until = {now} + :lease,
                free_at = {effective_free_at}
            WHERE limiter = :limiter AND {free} AND unit IN (SELECT unit FROM pick)
            RETURNING unit, calls, free_at - {now}"""  # noqa: S608
        )
        self._renew = text(
            f"UPDATE rate_units SET lease_until = {now} + :lease "  # noqa: S608
            "WHERE limiter = :limiter AND holder = :holder AND unit IN :units RETURNING unit"
        ).bindparams(bindparam("units", expanding=True))
        self._release = text(
            "UPDATE rate_units SET holder = NULL, lease_until = NULL, "  # noqa: S608
            f"free_at = {greatest}(free_at, {now} + :wait) "
            "WHERE limiter = :limiter AND unit = :unit AND holder = :holder"
        )

    # -- the database: one statement each --------------------------------------------

    def acquire(self, count: int) -> int:
        """Lease up to `count` more units, the soonest free first; returns how many came."""
        if count <= 0:
            return 0
        self._ensure_rows()
        params = {"holder": self.holder, "lease": LEASE, "spacing": SPACING}
        params |= {"limiter": self.limiter, "count": count}
        sent = self._clock()
        with self._engine.connect() as conn:
            rows = conn.execute(self._acquire, self._with_now(params)).all()
            conn.commit()
        received = self._clock()
        lease_end = sent + LEASE * (1 - DRIFT) - LEASE_MARGIN
        with self._changed:
            for number, calls, wait in rows:
                self._units[number] = Unit(
                    number, calls, lease_end, received + max(0.0, wait) * (1 + DRIFT)
                )
            self._changed.notify_all()
        return len(rows)

    def renew(self) -> int:
        """Extend the lease of every unit held; returns how many are still held."""
        with self._changed:
            numbers = list(self._units)
        if not numbers:
            return 0
        params = {"lease": LEASE, "limiter": self.limiter, "holder": self.holder}
        sent = self._clock()
        with self._engine.connect() as conn:
            kept = {
                row[0]
                for row in conn.execute(self._renew, self._with_now(params | {"units": numbers}))
            }
            conn.commit()
        lease_end = sent + LEASE * (1 - DRIFT) - LEASE_MARGIN
        with self._changed:
            for number in numbers:
                unit = self._units.get(number)
                if unit is None:
                    continue
                if number in kept:
                    unit.lease_end = max(unit.lease_end, lease_end)
                elif not unit.busy:
                    # Taken by another holder after our lease ran out (we sent nothing since).
                    del self._units[number]
            self._changed.notify_all()
            return len(self._units)

    def release(self, idle_for: float = 0.0) -> int:
        """Give back the units not in use and unused for `idle_for` seconds; how many went."""
        now = self._clock()
        with self._changed:
            going = [
                unit
                for unit in self._units.values()
                if not unit.busy and now - unit.used_at >= idle_for
            ]
            for unit in going:
                del self._units[unit.number]  # no call may start on them from here on
        if not going:
            return 0
        sent = self._clock()
        # The database reads its clock after `sent`: a wait counted from then ends late.
        rows = [
            self._with_now(
                {
                    "limiter": self.limiter,
                    "unit": unit.number,
                    "holder": self.holder,
                    "wait": max(0.0, unit.clear_at() - sent) + self._resolution,
                }
            )
            for unit in going
        ]
        with self._engine.connect() as conn:
            conn.execute(self._release, rows)
            conn.commit()
        return len(going)

    def _ensure_rows(self) -> None:
        if self._rows_exist:
            return
        rows = [
            {"limiter": self.limiter, "unit": k, "calls": calls, "free_at": 0.0}
            for k, calls in enumerate(unit_calls(self.rate))
        ]
        with self._engine.connect() as conn:
            insert_ignore_rows(conn, RateUnit, rows)
            conn.commit()
        self._rows_exist = True

    def _with_now(self, params: dict[str, object]) -> dict[str, object]:
        if self._db_clock is not None:
            params["db_now"] = self._db_clock()
        return params

    # -- this process: pacing on the local clock ---------------------------------------

    def held(self) -> int:
        with self._changed:
            return len(self._units)

    def calls_per_second(self) -> float:
        """What the units held allow, all together."""
        with self._changed:
            return sum(unit.calls for unit in self._units.values()) / SPACING

    def renew_due(self) -> bool:
        """True when some unit held has less than RENEW_AHEAD of its lease left."""
        now = self._clock()
        with self._changed:
            return any(unit.lease_end - now < RENEW_AHEAD for unit in self._units.values())

    def try_checkout(self) -> Grant | None:
        """A unit that may start a call now, marked busy; None if none may."""
        with self._changed:
            return self._checkout(self._clock())

    def checkout(self, until: float) -> Grant | None:
        """Wait, up to the monotonic time `until`, for a unit that may start a call now."""
        with self._changed:
            while True:
                now = self._clock()
                grant = self._checkout(now)
                if grant is not None or now >= until:
                    return grant
                self._changed.wait(min(until, self._next_ready(now)) - now)

    def finish(self, grant: Grant, written_at: float | None) -> None:
        """Check a unit back in: `written_at` is when the call's last byte left, None if
        nothing was sent. When it cannot be known, pass the time the call returned."""
        with self._changed:
            unit = self._units.get(grant.unit)
            if unit is not None and unit.lease_no == grant.lease_no:
                unit.busy = False
                if written_at is not None:
                    if len(unit.sent) == unit.calls:
                        unit.sent.popleft()
                    unit.sent.append(written_at)
                    unit.used_at = written_at
            self._changed.notify_all()

    def _smoothed(self) -> float:
        """When this process may start its next call, whatever its units allow."""
        calls = sum(unit.calls for unit in self._units.values())
        return self._last_start + SMOOTHING * SPACING / max(1, calls)

    def _checkout(self, now: float) -> Grant | None:
        if now < self._smoothed():
            return None
        best = None
        for unit in self._units.values():
            if unit.usable(now) and (best is None or unit.ready_at() < best.ready_at()):
                best = unit
        if best is None:
            return None
        best.busy = True
        self._last_start = now
        return Grant(best.number, best.lease_end, best.lease_no)

    def _next_ready(self, now: float) -> float:
        """When the next unit becomes usable, at most 0.1 s ahead (leases change meanwhile)."""
        soonest = now + 0.1
        for unit in self._units.values():
            if not unit.busy and unit.ready_at() < unit.lease_end:
                soonest = min(soonest, max(now, unit.ready_at()))
        return max(soonest, self._smoothed(), now + 0.0005)
