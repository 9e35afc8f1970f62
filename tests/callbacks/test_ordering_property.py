"""Any arrival order of a lifecycle, each delivery sent twice, ends in the serial state."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.models import Delivery, Task

from ..conftest import callback

# Timestamps in LIFECYCLES are seconds after the first delivery; each test places that
# 120 s before it starts, so that every delivery is within CALLBACK_MAX_AGE.
T0 = 0
DETAILS_1 = {"Input": {"StreamId": "in"}, "Outputs": [{"StreamId": "o", "Width": 1280}]}
DETAILS_2 = {"Input": {"StreamId": "in"}, "Outputs": [{"StreamId": "o", "Width": 640}]}

# (event, kwargs) in the order ZEGOCLOUD produced them.
LIFECYCLES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "user stop": [
        ("transcode_start", {"sequence": 1, "timestamp": T0, "details": DETAILS_1}),
        (
            "transcode_start",
            {
                "sequence": 2,
                "status": "TranscodeUpdated",
                "timestamp": T0 + 5,
                "details": DETAILS_2,
            },
        ),
        (
            "transcode_stop",
            {"sequence": 3, "stop_reason": 0, "timestamp": T0 + 30, "user_id": "op"},
        ),
    ],
    "automatic stop without sequence": [
        ("transcode_start", {"sequence": 1, "timestamp": T0, "details": DETAILS_1}),
        (
            "transcode_start",
            {
                "sequence": 2,
                "status": "TranscodeUpdated",
                "timestamp": T0 + 5,
                "details": DETAILS_2,
            },
        ),
        ("transcode_stop", {"sequence": None, "stop_reason": 1, "timestamp": T0 + 30}),
    ],
    "automatic stop, then a restart": [
        ("transcode_start", {"sequence": 1, "timestamp": T0, "details": DETAILS_1}),
        (
            "transcode_start",
            {
                "sequence": 2,
                "status": "TranscodeUpdated",
                "timestamp": T0 + 5,
                "details": DETAILS_2,
            },
        ),
        ("transcode_stop", {"sequence": 0, "stop_reason": 1, "timestamp": T0 + 30}),
        ("transcode_start", {"sequence": 3, "timestamp": T0 + 40, "details": DETAILS_1}),
    ],
    "stop shaped like the documented example": [
        ("transcode_start", {"sequence": 0, "timestamp": T0, "details": DETAILS_1}),
        (
            "transcode_stop",
            {"sequence": 0, "stop_reason": 0, "status": "TranscodeStarted", "timestamp": T0 + 9},
        ),
    ],
    "restart after stop": [
        ("transcode_start", {"sequence": 1, "timestamp": T0, "details": DETAILS_1}),
        ("transcode_stop", {"sequence": 2, "stop_reason": 0, "timestamp": T0 + 10}),
        ("transcode_start", {"sequence": 3, "timestamp": T0 + 20, "details": DETAILS_2}),
        (
            "transcode_start",
            {
                "sequence": 4,
                "status": "TranscodeUpdated",
                "timestamp": T0 + 25,
                "details": DETAILS_1,
            },
        ),
    ],
}

STATE_FIELDS = (
    "status",
    "owner",
    "max_seq",
    "input",
    "outputs",
    "started_at",
    "ended_at",
    "stop_reason",
)


def run(
    client: FlaskClient,
    db: Session,
    steps: list[tuple[str, dict[str, Any]]],
    order: list[int],
    t0: int,
) -> tuple[Any, ...]:
    task_id = f"prop-{uuid.uuid4().hex[:12]}"
    bodies = [
        callback(event, task_id=task_id, **{**kw, "timestamp": t0 + kw["timestamp"]})
        for event, kw in steps
    ]
    for i in order:
        response = client.post(
            "/callbacks/zego", data=json.dumps(bodies[i]), content_type="application/json"
        )
        assert response.status_code == 200
    db.rollback()
    task = db.execute(select(Task).where(Task.task_id == task_id)).scalar_one()
    verdicts = (
        db.execute(select(Delivery.verdict).where(Delivery.task_pk == task.id)).scalars().all()
    )
    assert verdicts.count("duplicate") == len(order) - len(steps)
    return tuple(getattr(task, f) for f in STATE_FIELDS)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), name=st.sampled_from(sorted(LIFECYCLES)))
def test_every_arrival_order_ends_in_the_serial_state(
    client: FlaskClient, db: Session, data: st.DataObject, name: str
) -> None:
    steps = LIFECYCLES[name]
    t0 = int(time.time()) - 120
    serial = run(client, db, steps, [i for i in range(len(steps)) for _ in range(2)], t0)
    shuffled = data.draw(st.permutations([i for i in range(len(steps)) for _ in range(2)]))
    assert run(client, db, steps, shuffled, t0) == serial


def test_serial_states_are_what_the_rules_say(client: FlaskClient, db: Session) -> None:
    t0 = int(time.time()) - 120
    user_stop = run(client, db, LIFECYCLES["user stop"], [0, 1, 2], t0)
    assert user_stop[:5] == ("stopped", "user-1", 3, DETAILS_2["Input"], DETAILS_2["Outputs"])
    auto = run(client, db, LIFECYCLES["automatic stop without sequence"], [0, 1, 2], t0)
    assert (auto[0], auto[-1]) == ("failed", 1)
    restart = run(client, db, LIFECYCLES["restart after stop"], [0, 1, 2, 3], t0)
    assert (restart[0], restart[4], restart[6]) == ("running", DETAILS_1["Outputs"], None)
