"""Random lifecycles for the property tests: 1-3 runs with restarts, lost starts and
stops, failure stops with a low or missing Sequence, updates and our stop requests.

Runs begin RUN_GAP apart and last at most RUN_LENGTH, so that two failure stops with
the same Sequence in two runs are further apart than lifecycle.RESEND_SPAN: two
failures, not a resend (closer, which one is kept would depend on arrival order). A
lifecycle spans at most MAX_SPAN seconds, within CALLBACK_MAX_AGE either side of a
moment in its middle."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import strategies as st

from manager.callbacks.deliveries import RESEND_SPAN

RUN_GAP = (175, 180)
RUN_LENGTH = 4 * 8 + 1
MAX_SPAN = 2 * RUN_GAP[1] + RUN_LENGTH
assert RUN_GAP[0] - RUN_LENGTH > RESEND_SPAN.total_seconds()  # noqa: S101


@dataclass(frozen=True)
class Step:
    """One event as produced: kind is start, update, request or stop."""

    kind: str
    sequence: int
    offset: int  # seconds after the lifecycle's first moment
    stop_reason: int | None = None


def random_lifecycle(rng: random.Random, *, requests: bool = True) -> list[Step]:
    steps: list[Step] = []
    seq, t = 1, 0
    for run in range(rng.randint(1, 3)):
        t = run * RUN_GAP[0] + rng.randint(0, RUN_GAP[1] - RUN_GAP[0])
        begun = t
        if rng.random() < 0.75 or not steps:  # the start may be lost, but not the first
            steps.append(Step("start", seq, t))
        seq, t = seq + 1, t + rng.randint(1, 8)
        for _ in range(rng.randint(0, 2)):
            low = rng.random() < 0.2  # an update sent without a Sequence
            steps.append(Step("update", 0 if low else seq, t))
            seq, t = seq + 1, t + rng.randint(1, 8)
        if requests and rng.random() < 0.4:
            steps.append(Step("request", seq, t))
            t += rng.randint(0, 8)
        ending = rng.choice(["stop", "failure", "failure-seq0", "failure-no-seq", "lost", "open"])
        if ending == "stop":
            steps.append(Step("stop", seq, t, stop_reason=0))
        elif ending == "failure":
            steps.append(Step("stop", seq, t, stop_reason=1))
        elif ending in ("failure-seq0", "failure-no-seq"):
            steps.append(Step("stop", 0, t, stop_reason=1))
        if ending == "open":
            break
        assert t - begun <= RUN_LENGTH  # noqa: S101
        seq = seq + 1
    assert t <= MAX_SPAN  # noqa: S101
    return steps


def lifecycles(*, requests: bool = True) -> st.SearchStrategy[list[Step]]:
    return st.randoms(use_true_random=False).map(
        lambda rng: random_lifecycle(rng, requests=requests)
    )
