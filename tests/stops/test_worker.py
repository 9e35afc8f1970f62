"""The stop worker: every stop sent once on leased units, waits explained, answers recorded."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines
from manager.config import Settings
from manager.models import Delivery, StopAttempt, StopRequest, Task
from manager.stops.dispatch import Dispatcher, make_dispatcher, send_on_unit
from manager.stops.ratelimit import RateShare, unit_calls
from manager.stops.requests import Job
from manager.stops.worker import StopWorker
from manager.zego.fake_server import FakeServer

from ..callbacks.test_retention import age, stop_and_start
from ..conftest import callback
from ..live import free_port

TASKS = 6


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


def dispatcher(app: Flask) -> Dispatcher:
    ext = app.extensions
    return make_dispatcher(
        ext["manager.settings"], ext["manager.engine"], ext["manager.sessions"], "worker"
    )


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


def waits(reason: str) -> float:
    return REGISTRY.get_sample_value("manager_stop_waits_total", {"reason": reason}) or 0.0


def test_one_pass_sends_a_batch_once_each(
    app: Flask, queued: list[str], fake_zego: FakeServer, db: Session, workers: list[StopWorker]
) -> None:
    worker = StopWorker(dispatcher(app), threads=2, batch=4)
    workers.append(worker)
    assert worker.run_once() == 4
    assert worker.run_once() == 2
    assert stop_calls(fake_zego) == dict.fromkeys(queued, 1)
    states = Counter(db.execute(select(StopRequest.state, StopRequest.attempts)).all())
    assert states == {("succeeded", 1): TASKS}
    assert db.execute(select(func.count()).select_from(StopAttempt)).scalar_one() == TASKS
    assert worker.share.held() == 0  # given back after the pass


def test_claimed_requests_without_a_unit_go_back_saying_why(
    app: Flask,
    queued: list[str],
    fake_zego: FakeServer,
    db: Session,
    workers: list[StopWorker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = dispatcher(app)
    hog = RateShare(app.extensions["manager.engine"], "zego_api", made.limiter.rate)
    assert hog.acquire(1000) == len(unit_calls(made.limiter.rate))  # another process holds all
    before = waits("rate_limit")
    worker = StopWorker(made, threads=2, batch=4, patience=0.3)
    workers.append(worker)
    assert worker.run_once() == 0
    assert stop_calls(fake_zego) == {}
    rows = db.execute(
        select(
            StopRequest.state, StopRequest.claimed_by, StopRequest.attempts, StopRequest.wait_reason
        )
    )
    assert Counter(rows.all()) == {
        ("queued", None, 0, "rate_limit"): 4,
        ("queued", None, 0, None): 2,
    }
    assert waits("rate_limit") == before + 4
    assert any("no share of the ZEGOCLOUD rate limit" in r.getMessage() for r in caplog.records)
    hog.release()
    # Once the units are free the same requests go, and say no more why they wait.
    assert worker.run_once() == 4
    assert worker.run_once() == 2
    db.rollback()  # a fresh snapshot
    rows = db.execute(select(StopRequest.state, StopRequest.wait_reason))
    assert Counter(rows.all()) == {("succeeded", None): TASKS}


def test_running_worker_sends_every_stop_once_and_lets_go_when_stopped(
    app: Flask, queued: list[str], fake_zego: FakeServer, db: Session, workers: list[StopWorker]
) -> None:
    worker = StopWorker(dispatcher(app), threads=2, batch=4)
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
    # Stopping drains: every answer is recorded, no claim is left behind, no unit kept.
    rows = db.execute(select(StopRequest.state, StopRequest.claimed_by, StopRequest.attempts))
    assert Counter(rows.all()) == {("succeeded", None, 1): TASKS}
    assert worker.share.held() == 0


def test_a_call_whose_lease_ran_out_before_its_first_byte_is_not_sent(
    app: Flask, fake_zego: FakeServer
) -> None:
    made = dispatcher(app)
    assert made.limiter.acquire(1) == 1
    grant = made.limiter.try_checkout()
    assert grant is not None
    lapsed = replace(grant, deadline=time.monotonic() - 0.001)
    job = Job(1, "w-0", "owner-w-0", 2, 0)
    assert send_on_unit(made.client, made.limiter, job, lapsed) is None
    assert fake_zego.fake.calls == []
    # Nothing was sent, so the unit may start a call as soon as the process may.
    again = made.limiter.checkout(time.monotonic() + 1.0)
    assert again is not None
    assert again.unit == grant.unit
    reply = send_on_unit(made.client, made.limiter, job, again)
    assert reply is not None
    assert len(fake_zego.fake.calls) == 1
    assert made.limiter.try_checkout() is None  # a call went: the unit waits its spacing
    made.limiter.release()


def test_an_operators_stop_without_a_unit_is_left_to_the_worker_saying_why(
    app: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    fake_zego: FakeServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = json.dumps(callback(task_id="w-0", user_id="owner-w-0", sequence=1))
    client.post("/callbacks/zego", data=body, content_type="application/json")
    rate = app.extensions["manager.settings"].zego_rate_limit
    hog = RateShare(app.extensions["manager.engine"], "zego_api", rate)
    assert hog.acquire(1000) == len(unit_calls(rate))
    monkeypatch.setattr("manager.stops.dispatch.FIRST_ATTEMPT_MAX_WAIT", 0.3)
    caplog.set_level(logging.WARNING)
    response = client.post("/api/tasks/w-0/stop", headers=auth)
    assert response.status_code == 202, response.json
    stop = response.json["stop_request"]
    assert (stop["state"], stop["attempts"], stop["wait_reason"]) == ("queued", 0, "rate_limit")
    assert fake_zego.fake.calls == []
    assert any("no share of the ZEGOCLOUD rate limit" in r.getMessage() for r in caplog.records)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'manager_stop_requests_queued{wait_reason="rate_limit"} 1.0' in metrics
    hog.release()


def test_a_zegocloud_that_cannot_be_reached_shows_in_the_stop_the_log_and_the_metrics(
    settings: Settings,
    client: FlaskClient,
    auth: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = json.dumps(callback(task_id="w-0", user_id="owner-w-0", sequence=1))
    client.post("/callbacks/zego", data=body, content_type="application/json")
    nowhere = create_app(replace(settings, zego_api_url=f"http://127.0.0.1:{free_port()}/"))
    before = waits("zego_unreachable")
    caplog.set_level(logging.WARNING)
    try:
        response = nowhere.test_client().post("/api/tasks/w-0/stop", headers=auth)
        metrics = nowhere.test_client().get("/metrics").get_data(as_text=True)
    finally:
        dispose_engines(nowhere)
    assert response.status_code == 202, response.json
    stop = response.json["stop_request"]
    assert (stop["state"], stop["attempts"], stop["wait_reason"]) == (
        "queued",
        1,
        "zego_unreachable",
    )
    assert waits("zego_unreachable") == before + 1
    assert any("ZEGOCLOUD not reached" in r.getMessage() for r in caplog.records)
    assert 'manager_stop_requests_queued{wait_reason="zego_unreachable"} 1.0' in metrics


def test_the_worker_prunes_deliveries_past_the_retention(
    app: Flask,
    client: FlaskClient,
    runner: FlaskCliRunner,
    db: Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`manager worker` (one pass here) prunes with DELIVERY_RETENTION_DAYS (default 90):
    an old, ended task's events go, a recent one's stay; logged and counted."""
    stop_and_start(client, "old-1")
    stop_and_start(client, "new-1")
    age(db, ["old-1"], timedelta(days=200))
    before = REGISTRY.get_sample_value("manager_deliveries_pruned_total", {"what": "deliveries"})
    caplog.set_level(logging.INFO)
    result = runner.invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    db.rollback()
    left = Counter(db.execute(select(Task.task_id).join(Delivery)).scalars())
    assert left == {"new-1": 3}
    after = REGISTRY.get_sample_value("manager_deliveries_pruned_total", {"what": "deliveries"})
    assert (after or 0) - (before or 0) == 3
    assert any("pruned deliveries older than 90 days" in r.getMessage() for r in caplog.records)
