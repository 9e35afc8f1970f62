"""Recording stop attempts: answers that come late, Sequences overtaken while waiting,
answers kept when the database fails, and process names that fit their columns."""

from __future__ import annotations

import json
import os
import random
import socket
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import StopAttempt, StopRequest, Task
from manager.services import get_dispatcher
from manager.stops.attempts import record_attempts
from manager.stops.claims import claim_due, release
from manager.stops.dispatch import NAME_LENGTH, Dispatcher, make_dispatcher, process_name
from manager.stops.policy import RetryPolicy
from manager.stops.requests import Job, prepare_attempt, request_stop
from manager.stops.worker import StopWorker
from manager.zego.client import BAD_INPUT, ZegoReply
from manager.zego.fake_server import FakeServer

from ..conftest import callback

POLICY = RetryPolicy(max_attempts=5)
POLICY_RNG = random.Random(1)
SUCCESS = ZegoReply("success", 0, "success", "r-ok", 200, 5)
TIMEOUT = ZegoReply("retryable", None, "timed out", None, None, 3000)
SEQUENCE_TOO_LOW = ZegoReply("permanent", BAD_INPUT, "Sequence must be above 4", "r-2", 200, 5)


def deliver(client: FlaskClient, **fields: Any) -> None:
    body = json.dumps(callback(task_id="s-1", user_id="owner-1", **fields))
    response = client.post("/callbacks/zego", data=body, content_type="application/json")
    assert response.json["verdict"] == "applied"


def first_attempt(db: Session, claimant: str) -> Job:
    """A stop request for s-1, claimed by `claimant`, with its first Sequence: committed."""
    task = db.execute(select(Task).where(Task.task_id == "s-1")).scalar_one()
    stop, created = request_stop(
        db,
        task,
        requested_by="ops",
        reason=None,
        force=False,
        claimant=claimant,
        policy=POLICY,
        now=utcnow(),
    )
    assert created
    job = prepare_attempt(db, stop)
    db.commit()
    return job


def record(db: Session, job: Job, reply: ZegoReply, worker: str) -> None:
    record_attempts(db, [(job, reply)], worker=worker, policy=POLICY, now=utcnow(), rng=POLICY_RNG)
    db.commit()


def the_request(db: Session) -> StopRequest:
    db.rollback()  # a fresh snapshot
    return db.execute(select(StopRequest)).scalar_one()


def expire_lease(db: Session) -> None:
    past = utcnow() - timedelta(seconds=1)
    db.execute(update(StopRequest).values(claimed_until=past, next_attempt_at=past))
    db.commit()


def test_an_answer_after_the_lease_expired_does_not_undo_a_newer_outcome(
    client: FlaskClient, db: Session
) -> None:
    deliver(client, sequence=3)
    late = first_attempt(db, claimant="api:a:1")
    expire_lease(db)  # the API process stalled past its lease
    [retry] = claim_due(db, claimant="worker:b:2", limit=10, policy=POLICY, now=utcnow())
    db.commit()
    assert retry.sequence > late.sequence
    record(db, retry, SUCCESS, "worker:b:2")
    record(db, late, TIMEOUT, "api:a:1")  # the stalled call's answer, at last
    stop = the_request(db)
    assert (stop.state, stop.last_code, stop.last_request_id) == ("succeeded", 0, "r-ok")
    assert db.execute(select(func.count()).select_from(StopAttempt)).scalar_one() == 2


def test_only_the_claimant_releases_its_claim(client: FlaskClient, db: Session) -> None:
    deliver(client, sequence=3)
    job = first_attempt(db, claimant="api:a:1")
    release(db, [job.stop_request_id], "worker:b:2", "rate_limit")
    db.commit()
    assert (the_request(db).claimed_by, the_request(db).wait_reason) == ("api:a:1", None)
    release(db, [job.stop_request_id], "api:a:1", "rate_limit")
    db.commit()
    assert (the_request(db).claimed_by, the_request(db).wait_reason) == (None, "rate_limit")


def test_a_sequence_overtaken_while_waiting_for_a_slot_is_retried(
    client: FlaskClient, db: Session
) -> None:
    deliver(client, sequence=3)
    job = first_attempt(db, claimant="api:a:1")
    assert job.sequence == 4
    # While the attempt waited for a rate slot, the customer updated the task.
    deliver(client, sequence=4, status="TranscodeUpdated")
    record(db, job, SEQUENCE_TOO_LOW, "api:a:1")
    stop = the_request(db)
    assert (stop.state, stop.last_code) == ("queued", BAD_INPUT)
    expire_lease(db)
    [retry] = claim_due(db, claimant="worker:b:2", limit=10, policy=POLICY, now=utcnow())
    assert retry.sequence == 5  # above the one that overtook it


def test_an_input_error_without_a_newer_sequence_stays_permanent(
    client: FlaskClient, db: Session
) -> None:
    deliver(client, sequence=3)
    job = first_attempt(db, claimant="api:a:1")
    record(db, job, SEQUENCE_TOO_LOW, "api:a:1")
    assert the_request(db).state == "failed"


def refuse_the_first_write(dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The dispatcher's first write of answers fails as a lost connection would; the list
    numbers every write tried."""
    stored = dispatcher.record
    writes: list[int] = []

    def down_once(results: Any) -> list[str]:
        writes.append(len(writes) + 1)
        if len(writes) == 1:
            raise OperationalError("INSERT", {}, Exception("connection lost"))
        return stored(results)

    monkeypatch.setattr(dispatcher, "record", down_once)
    return writes


def test_the_worker_keeps_answers_the_database_would_not_take(
    app: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deliver(client, sequence=1)
    fake_zego.fake.seed("s-1", "owner-1", sequence=1, notify=False)
    response = client.post("/api/stops", json={"task_ids": ["s-1"]}, headers=auth)
    assert response.status_code == 202, response.json
    ext = app.extensions
    dispatcher = make_dispatcher(
        ext["manager.settings"], ext["manager.engine"], ext["manager.sessions"], "worker"
    )
    worker = StopWorker(dispatcher, threads=1, batch=4)
    try:
        writes = refuse_the_first_write(dispatcher, monkeypatch)
        with pytest.raises(OperationalError):
            worker.run_once()
        assert the_request(db).state == "queued"
        assert worker.record(force=True) == 1  # the answer was kept, and goes in now
        assert writes == [1, 2]
    finally:
        worker.close()
    assert the_request(db).state == "succeeded"
    assert fake_zego.fake.tasks["s-1"].stops == [2]  # sent once


def test_a_long_host_name_fits_the_claim_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "p" * 63)
    name = process_name("worker")
    assert len(name) <= NAME_LENGTH
    assert name.startswith("worker:ppp")
    assert name.endswith(f":{os.getpid()}")


def api_dispatcher(app: Flask) -> Dispatcher:
    with app.app_context():
        return get_dispatcher()


def test_the_api_stores_an_answer_after_the_database_refused_it_once(
    app: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deliver(client, sequence=3)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    writes = refuse_the_first_write(api_dispatcher(app), monkeypatch)
    monkeypatch.setattr("manager.stops.dispatch.RECORD_RETRY_DELAY", 0.01)
    response = client.post("/api/tasks/s-1/stop", headers=auth)
    assert response.status_code == 200, response.json
    assert response.json["stop_request"]["state"] == "succeeded"
    assert writes == [1, 2]
    assert fake_zego.fake.tasks["s-1"].stops == [4]  # sent once
