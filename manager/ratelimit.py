"""A rate limit shared by every process: slots reserved with one atomic UPDATE.

Each call reserves the next free send time in `rate_limiters` and waits for it.
Slots are spaced evenly, so any one-second window holds at most `rate` calls,
whichever processes made them. Times come from the database's clock, so the
hosts' clocks need not agree.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, select, text

from .models import RateLimiter
from .sqlutil import insert_ignore_core

# Pace a little below the limit, so that network jitter between our send and the
# far end's arrival time never puts one call too many into a one-second window.
HEADROOM = 0.97

_NOW = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}
_GREATEST = {"postgresql": "GREATEST", "sqlite": "MAX"}


class SharedRateLimiter:
    def __init__(self, engine: Engine, name: str, rate: int) -> None:
        self._engine = engine
        self.name = name
        self.interval = 1.0 / (rate * HEADROOM)
        dialect = engine.dialect.name
        now, greatest = _NOW[dialect], _GREATEST[dialect]
        # Only per-dialect constants are formatted in; every value is a bound parameter.
        sql = " ".join(
            [
                f"UPDATE rate_limiters SET next_slot = {greatest}(next_slot, {now}) + :span",  # noqa: S608
                f"WHERE name = :name AND next_slot <= {now} + :max_wait",
                f"RETURNING next_slot - :span - {now}",
            ]
        )
        self._reserve = text(sql)

    def reserve(self, max_wait: float) -> float | None:
        """Seconds to wait before the reserved call may go; None if that would exceed max_wait."""
        waits = self.reserve_many(1, max_wait)
        return None if waits is None else waits[0]

    def reserve_many(self, count: int, max_wait: float) -> list[float] | None:
        """Reserve `count` consecutive slots in one statement; the seconds to wait for each.

        None when the first free slot lies more than max_wait ahead.
        """
        params = {"span": count * self.interval, "name": self.name, "max_wait": max_wait}
        with self._engine.begin() as conn:
            row = conn.execute(self._reserve, params).first()
            if row is None:
                # Either the slots are taken too far ahead, or this is the limiter's first
                # use: create its row (or wait for whoever is creating it) and ask again.
                if not self._exists(conn):
                    insert_ignore_core(
                        conn, RateLimiter, {"name": self.name, "next_slot": 0.0}, ["name"]
                    )
                row = conn.execute(self._reserve, params).first()
        if row is None:
            return None
        first = float(row[0])
        return [max(0.0, first + i * self.interval) for i in range(count)]

    def _exists(self, conn: Connection) -> bool:
        query = select(RateLimiter.name).where(RateLimiter.name == self.name)
        return conn.execute(query).first() is not None
