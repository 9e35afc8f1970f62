"""The retry policy, pure: what an answer makes of a request, and when it is tried again."""

from __future__ import annotations

import random

import pytest

from manager.stops.policy import RetryPolicy

POLICY = RetryPolicy(max_attempts=3)


@pytest.mark.parametrize(
    ("outcome", "attempts", "state"),
    [
        ("success", 1, "succeeded"),
        ("success", 3, "succeeded"),  # the last attempt may still succeed
        ("permanent", 1, "failed"),  # refused for good: never tried again
        ("retryable", 1, "queued"),
        ("retryable", 2, "queued"),
        ("retryable", 3, "failed"),  # the last attempt
    ],
)
def test_an_answer_moves_its_request(outcome: str, attempts: int, state: str) -> None:
    assert POLICY.next_state(outcome, attempts) == state


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    rng = random.Random(7)
    for attempts, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (9, 300.0), (30, 300.0)]:
        delays = [POLICY.delay(attempts, rng) for _ in range(200)]
        assert min(delays) >= ceiling / 2
        assert max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not fixed
