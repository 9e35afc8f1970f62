"""End to end, on the suite's database: random lifecycles delivered in random orders
with duplicates, our stop requests among them; a receiver that verifies every request
with the standardwebhooks library's own verifier, failing half the time for a while.

A consumer that keeps the highest version per task holds the task as the API serves
it; every event arrives, each task's in version order; a stale or duplicate callback
emits nothing."""

from __future__ import annotations

import json
import random
import time

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.models import Event, Task

from ..callbacks.lifecycles import MAX_SPAN, random_lifecycle
from ..callbacks.test_history_property import body, deliver
from .conftest import drain, sender_for, subscribe
from .receiver import Receiver

TASKS = 12


def arrival(rng: random.Random, count: int) -> list[int]:
    """Every index once, in a random order, about a third of them twice."""
    order = list(range(count)) + [i for i in range(count) if rng.random() < 0.35]
    rng.shuffle(order)
    return order


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_highest_version_a_receiver_keeps_is_the_task(
    app: Flask,
    client: FlaskClient,
    receiver: Receiver,
    db: Session,
    auth: dict[str, str],
    seed: int,
) -> None:
    rng = random.Random(seed)
    subscribe(app, receiver)
    t0 = int(time.time()) - MAX_SPAN // 2  # every callback within CALLBACK_MAX_AGE
    lifecycles = {}
    for n in range(TASKS):
        steps = random_lifecycle(rng)
        task_id = deliver(app, client, steps, arrival(rng, len(steps)), f"owner-{n % 3}", t0)
        lifecycles[task_id] = steps

    sender = sender_for(app)
    receiver.fail_rate = 0.5
    for _ in range(20):  # a while of failing half the time...
        sender.run_once()
    assert receiver.failed > 0
    receiver.fail_rate = 0.0  # ...then the receiver recovers
    drain(sender, app)
    assert receiver.refused == 0

    kept = receiver.highest()
    db.rollback()
    versions = {row.task_id: row.version for row in db.execute(select(Task.task_id, Task.version))}
    for task_id in lifecycles:
        served = client.get(f"/api/tasks/{task_id}", headers=auth).json["task"]
        snapshot = kept[task_id].task
        assert {name: served[name] for name in snapshot} == snapshot, task_id
        assert kept[task_id].version == served["version"] == versions[task_id]
        # Every version, once each and in order: all types go to this subscription.
        arrived = [r.version for r in receiver.received if r.task["task_id"] == task_id]
        assert arrived == list(range(1, versions[task_id] + 1)), task_id

    # Every stored event reached the receiver, under its own id.
    event_ids = {f"evt_{i}" for i in db.scalars(select(Event.id))}
    assert receiver.ids() == event_ids

    # Every callback again: all duplicates now, so nothing more is emitted.
    for task_id, steps in lifecycles.items():
        owner = next(iter({r.task["owner"] for r in receiver.received if r.task["owner"]}), "x")
        for step in steps:
            if step.kind == "request":
                continue
            response = client.post(
                "/callbacks/zego",
                data=json.dumps(body(step, task_id, owner, t0)),
                content_type="application/json",
            )
            assert response.json["verdict"] == "duplicate", (task_id, step)
    db.rollback()
    assert {
        row.task_id: row.version for row in db.execute(select(Task.task_id, Task.version))
    } == versions
    assert {f"evt_{i}" for i in db.scalars(select(Event.id))} == event_ids
