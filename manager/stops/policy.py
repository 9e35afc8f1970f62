"""The retry policy, pure: when to try a stop again, and what an answer makes of it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from manager.vocabulary import StopState
from manager.zego.client import Outcome


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay: float = 2.0
    max_delay: float = 300.0
    lease: timedelta = timedelta(seconds=120)

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Exponential backoff with jitter: half fixed, half random, capped."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, attempts - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)

    def next_state(self, outcome: str, attempts: int) -> str:
        """What an answer makes of its request after `attempts` attempts: succeeded; failed
        (refused for good, or the last attempt); or queued for another."""
        if outcome == Outcome.SUCCESS:
            return StopState.SUCCEEDED
        if outcome == Outcome.PERMANENT or attempts >= self.max_attempts:
            return StopState.FAILED
        return StopState.QUEUED
