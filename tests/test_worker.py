"""The stop worker: slots reserved ahead, calls only in their slots, every answer recorded."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.dispatch import Dispatcher, make_dispatcher
from manager.models import StopAttempt, StopRequest
from manager.ratelimit import SharedRateLimiter
from manager.worker import ProcessSenders, StopWorker
from manager.zego.fake import FakeServer

from .conftest import callback

TASKS = 6


class LateFirstReservation(SharedRateLimiter):
    """Places its first reservation a second in the past, as a stalled process finds it."""

    shifted = 0

    def reserve_many(self, count: int, max_wait: float) -> list[float] | None:
        slots = super().reserve_many(count, max_wait)
        if slots is None or self.shifted:
            return slots
        self.shifted = count
        return [slot - 1.0 for slot in slots]


class NoSlots(SharedRateLimiter):
    """Every slot is taken further ahead than anyone may wait."""

    def reserve_many(self, count: int, max_wait: float) -> list[float] | None:
        return None


@pytest.fixture
def queued(client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer) -> list[str]:
    """TASKS running tasks, each with a queued stop request."""
    task_ids = [f"w-{i}" for i in range(TASKS)]
    for task_id in task_ids:
        body = json.dumps(callback(task_id=task_id, user_id=f"owner-{task_id}", sequence=1))
        response = client.post("/callbacks/zego", data=body, content_type="application/json")
        assert response.status_code == 200
        fake_zego.fake.seed(task_id, f"owner-{task_id}", sequence=1, notify=False)
    response = client.post("/api/stops", json={"all_running": True}, headers=auth)
    assert response.json["batch"]["total"] == TASKS
    return task_ids


def dispatcher(app: Flask, limiter: type[SharedRateLimiter] = SharedRateLimiter) -> Dispatcher:
    ext = app.extensions
    made = make_dispatcher(
        ext["manager.settings"], ext["manager.engine"], ext["manager.sessions"], "worker"
    )
    made.limiter = limiter(ext["manager.engine"], made.limiter.name, made.limiter.rate)
    return made


@pytest.fixture
def workers() -> Iterator[list[StopWorker]]:
    made: list[StopWorker] = []
    yield made
    for worker in made:
        worker.close()


def stop_calls(fake_zego: FakeServer) -> Counter[str]:
    return Counter(
        c["task_id"] for c in fake_zego.fake.calls if c["action"] == "StopCloudTranscode"
    )


def test_calls_that_miss_their_slot_take_a_fresh_one_and_go_once(
    app: Flask,
    queued: list[str],
    fake_zego: FakeServer,
    db: Session,
    workers: list[StopWorker],
) -> None:
    worker = StopWorker(dispatcher(app, LateFirstReservation), threads=2, batch=4)
    workers.append(worker)
    assert worker.run_once() == 4
    assert isinstance(worker.dispatcher.limiter, LateFirstReservation)
    assert worker.dispatcher.limiter.shifted == 4  # all four missed their first slots
    assert worker.run_once() == 2
    assert stop_calls(fake_zego) == dict.fromkeys(queued, 1)  # no call went out late
    states = Counter(db.execute(select(StopRequest.state, StopRequest.attempts)).all())
    assert states == {("succeeded", 1): TASKS}
    assert db.execute(select(func.count()).select_from(StopAttempt)).scalar_one() == TASKS


def test_claimed_requests_without_a_slot_go_back_untouched(
    app: Flask,
    queued: list[str],
    fake_zego: FakeServer,
    db: Session,
    workers: list[StopWorker],
) -> None:
    worker = StopWorker(dispatcher(app, NoSlots), threads=2, batch=4)
    workers.append(worker)
    assert worker.run_once() == 0
    assert stop_calls(fake_zego) == {}
    rows = db.execute(select(StopRequest.state, StopRequest.claimed_by, StopRequest.attempts))
    assert Counter(rows.all()) == {("queued", None, 0): TASKS}


@pytest.mark.parametrize("separate_process", [False, True], ids=["threads", "process"])
def test_running_worker_sends_every_stop_once_and_lets_go_when_stopped(
    app: Flask,
    queued: list[str],
    fake_zego: FakeServer,
    db: Session,
    workers: list[StopWorker],
    separate_process: bool,
) -> None:
    worker = StopWorker(dispatcher(app), threads=2, batch=4, separate_process=separate_process)
    workers.append(worker)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop, 0.05))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(stop_calls(fake_zego).values()) < TASKS:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert stop_calls(fake_zego) == dict.fromkeys(queued, 1)
    # Stopping drains: every answer is recorded and no claim is left behind.
    rows = db.execute(select(StopRequest.state, StopRequest.claimed_by, StopRequest.attempts))
    assert Counter(rows.all()) == {("succeeded", None, 1): TASKS}


def test_a_dead_sender_process_is_replaced(
    app: Flask,
    queued: list[str],
    fake_zego: FakeServer,
    db: Session,
    workers: list[StopWorker],
) -> None:
    worker = StopWorker(dispatcher(app), threads=2, batch=TASKS, separate_process=True)
    workers.append(worker)
    senders = worker._senders
    assert isinstance(senders, ProcessSenders)
    senders._process.kill()
    senders._process.join()
    assert worker.run_once() == TASKS
    assert worker._senders is not senders
    assert stop_calls(fake_zego) == dict.fromkeys(queued, 1)
    rows = db.execute(select(StopRequest.state, StopRequest.claimed_by, StopRequest.attempts))
    assert Counter(rows.all()) == {("succeeded", None, 1): TASKS}
