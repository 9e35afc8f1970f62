"""Sending the outbox: signed requests, order per task, retries, give-ups, disabling,
claims that ran out, replay and secret rotation, against a real receiver."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.db import write_connection
from manager.events.health import health_by_subscription
from manager.events.replay import Replayed, replay
from manager.events.secrets import Sealer
from manager.events.sending import NEVER, Answer, claim, record
from manager.events.subscriptions import (
    disable_subscription,
    enable_subscription,
    rotate_secret,
)
from manager.models import Event, EventAttempt, EventSend, Subscription
from manager.vocabulary import SendState

from ..conftest import callback
from .conftest import FAST, KEY, drain, sender_for, subscribe
from .receiver import Receiver


def lifecycle(client: FlaskClient, task_id: str = "task-1", t: int | None = None) -> None:
    """start, update, stop: four events (task.started, task.updated, run.ended, task.stopped)."""
    t = t or int(time.time()) - 60
    for body in (
        callback(task_id=task_id, sequence=1, timestamp=t),
        callback(task_id=task_id, sequence=2, status="TranscodeUpdated", timestamp=t + 1),
        callback("transcode_stop", task_id=task_id, sequence=3, timestamp=t + 2),
    ):
        assert client.post("/callbacks/zego", json=body).status_code == 200


def sends(db: Session) -> list[EventSend]:
    db.rollback()
    return list(db.scalars(select(EventSend).order_by(EventSend.id)))


def test_every_event_arrives_signed_in_version_order(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    for n in range(5):
        lifecycle(client, f"t{n}")
    drain(sender_for(app), app)
    assert receiver.refused == 0
    assert len(receiver.received) == 20
    for n in range(5):
        versions = [r.version for r in receiver.received if r.task["task_id"] == f"t{n}"]
        assert versions == [1, 2, 3, 4]
    headers = receiver.headers[0]
    assert headers["webhook-id"].startswith("evt_")
    assert headers["content-type"] == "application/json"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert all(s.state == SendState.DELIVERED for s in sends(db))


def test_a_failing_receiver_gets_every_event_in_order_once_it_answers(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    receiver.fail_rate = 0.5
    for n in range(4):
        lifecycle(client, f"t{n}")
    drain(sender_for(app), app)
    assert receiver.failed > 0
    for n in range(4):
        versions = [r.version for r in receiver.received if r.task["task_id"] == f"t{n}"]
        assert versions == [1, 2, 3, 4]  # never a later one before an earlier one
    db.rollback()
    attempts = db.execute(select(EventAttempt.status)).scalars().all()
    assert attempts.count(500) == receiver.failed
    assert sorted(set(attempts)) == [204, 500]


def test_a_send_is_given_up_after_the_window_and_the_line_moves_on(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    receiver.status = 500
    lifecycle(client)
    policy = replace(FAST, give_up_after=timedelta(0), disable_after=timedelta(days=1))
    sender = sender_for(app, policy)
    drain(sender, app)
    assert [s.state for s in sends(db)] == [SendState.FAILED] * 4
    assert [s.attempts for s in sends(db)] == [1, 1, 1, 1]
    db.rollback()
    sub = db.scalars(select(Subscription)).one()
    assert sub.disabled_at is None
    assert sub.failing_since is not None


def test_a_subscription_failing_for_the_whole_window_is_disabled_and_says_so(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    receiver.status = 503
    lifecycle(client)
    sender = sender_for(app, replace(FAST, disable_after=timedelta(0)))
    sender.run_once()  # the first failure marks it failing, and the window is 0
    db.rollback()
    sub = db.scalars(select(Subscription)).one()
    assert sub.disabled_at is not None
    assert "every attempt failed since" in (sub.disabled_reason or "")
    # Nothing goes to a disabled subscription; what is pending waits for it.
    assert not sender.run_once().delivered
    assert [s.state for s in sends(db)] == [SendState.PENDING] * 4


def test_410_gone_disables_at_once(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    receiver.status = 410
    lifecycle(client)
    sender_for(app).run_once()
    db.rollback()
    assert "410 Gone" in (db.scalars(select(Subscription)).one().disabled_reason or "")


def test_a_success_clears_failing(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    receiver.status = 500
    lifecycle(client)
    sender = sender_for(app)
    sender.run_once()
    db.rollback()
    assert db.scalars(select(Subscription)).one().failing_since is not None
    receiver.status = 204
    drain(sender, app)
    db.rollback()
    sub = db.scalars(select(Subscription)).one()
    assert sub.failing_since is None
    assert sub.last_success_at is not None


def test_an_answer_to_a_claim_that_ran_out_changes_nothing(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    """A worker that outlived its lease: another has claimed the send again; the late
    answer is logged, but only the new claim moves the send."""
    subscribe(app, receiver)
    lifecycle(client)
    engine = app.extensions["manager.engine"]
    now = utcnow()
    with write_connection(engine) as conn:
        first = claim(conn, now=now, limit=1, lease=timedelta(seconds=1))[0]
    later = now + timedelta(seconds=2)
    with write_connection(engine) as conn:
        second = claim(conn, now=later, limit=1, lease=timedelta(seconds=30))[0]
    assert (first.send_id, first.attempt, second.attempt) == (second.send_id, 1, 2)
    with write_connection(engine) as conn:
        late = Answer(first, later, 5, status=204)
        record(conn, [late], policy=FAST, now=later, rng=random.Random(1))
    assert sends(db)[0].state == SendState.PENDING
    with write_connection(engine) as conn:
        on_time = Answer(second, later, 5, status=204)
        record(conn, [on_time], policy=FAST, now=later, rng=random.Random(1))
    assert sends(db)[0].state == SendState.DELIVERED


def test_replay_sends_the_same_events_again_with_their_ids(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    sub = subscribe(app, receiver)
    lifecycle(client)
    sender = sender_for(app)
    drain(sender, app)
    first = [(r.webhook_id, r.version) for r in receiver.received]
    with write_connection(app.extensions["manager.engine"]) as conn:
        assert replay(conn, sub.id, since=utcnow() - timedelta(hours=1), now=utcnow()).count == 4
    drain(sender, app)
    assert [(r.webhook_id, r.version) for r in receiver.received] == first + first
    with write_connection(app.extensions["manager.engine"]) as conn:
        assert replay(conn, sub.id, since=utcnow() + timedelta(hours=1), now=utcnow()).count == 0


def test_after_a_rotation_both_secrets_sign_for_a_while(
    app: Flask, client: FlaskClient, receiver: Receiver
) -> None:
    sub = subscribe(app, receiver)
    old = receiver.secret
    with Session(app.extensions["manager.engine"]) as session:
        new = rotate_secret(session, Sealer((KEY,)), sub.id, now=utcnow()).secret
        session.commit()
    assert new != old
    lifecycle(client)
    receiver.secret = old  # a receiver that has not switched yet
    drain(sender_for(app), app)
    assert receiver.refused == 0
    assert len(receiver.received) == 4
    assert len(receiver.headers[0]["webhook-signature"].split(" ")) == 2
    # Once the overlap is over, only the new secret signs.
    with write_connection(app.extensions["manager.engine"]) as conn:
        conn.execute(update(Subscription).values(previous_secret_until=utcnow()))
    receiver.secret = new
    lifecycle(client, "task-2")
    drain(sender_for(app), app)
    assert len(receiver.headers[-1]["webhook-signature"].split(" ")) == 1


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens there once the probe is closed


@pytest.mark.parametrize("port", ["closed_port", "silent_port"])
def test_no_answer_is_logged_and_retried(
    app: Flask,
    client: FlaskClient,
    receiver: Receiver,
    db: Session,
    port: str,
    request: pytest.FixtureRequest,
) -> None:
    subscribe(app, receiver, url=f"http://127.0.0.1:{request.getfixturevalue(port)}/hook")
    lifecycle(client)
    sender = sender_for(app)
    sender.timeout = 0.2
    sender.run_once()
    db.rollback()
    attempt = db.scalars(select(EventAttempt)).first()
    assert attempt is not None
    assert attempt.status is None
    assert attempt.error in ("no answer: connection failed", "no answer: timed out")
    assert sends(db)[0].state == SendState.PENDING


def test_a_disabled_subscriptions_sends_are_parked_until_it_is_enabled(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    """However many a disabled subscription has pending, the claim never walks them."""
    sub = subscribe(app, receiver)
    lifecycle(client)
    with Session(app.extensions["manager.engine"]) as session:
        disable_subscription(session, sub.id, reason="maintenance", now=utcnow())
        session.commit()
    assert {s.next_attempt_at for s in sends(db)} == {NEVER}
    with write_connection(app.extensions["manager.engine"]) as conn:
        # Replayed while disabled: parked too.
        replayed = replay(conn, sub.id, since=utcnow() - timedelta(hours=1), now=utcnow())
        assert replayed == Replayed(0, disabled=True)
        assert claim(conn, now=utcnow(), limit=10, lease=timedelta(seconds=5)) == []
    with Session(app.extensions["manager.engine"]) as session:
        enable_subscription(session, sub.id, now=utcnow())
        session.commit()
    drain(sender_for(app), app)
    assert [r.version for r in receiver.received] == [1, 2, 3, 4]


def test_without_the_key_nothing_is_sent_and_the_attempt_says_why(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    subscribe(app, receiver)
    lifecycle(client)
    keyless = sender_for(app)
    keyless.sealer = Sealer(())
    assert keyless.run_once().retrying == 1
    db.rollback()
    attempt = db.scalars(select(EventAttempt)).one()
    assert attempt.error == "not sent: SUBSCRIPTION_KEY is not set"
    assert receiver.received == []


def test_a_replayed_old_event_waits_and_retries_from_its_replay(
    app: Flask, client: FlaskClient, receiver: Receiver, db: Session
) -> None:
    """Four days old, replayed: its retry window and its wait run from the replay, so a
    first failure is retried, not given up on, and the oldest pending is not 4 days old."""
    sub = subscribe(app, receiver)
    lifecycle(client)
    sender = sender_for(app)
    drain(sender, app)
    engine = app.extensions["manager.engine"]
    long_ago = utcnow() - timedelta(days=4)
    with write_connection(engine) as conn:
        conn.execute(update(EventSend).values(created_at=long_ago))
        conn.execute(update(Event).values(created_at=long_ago))
        assert replay(conn, sub.id, since=long_ago, now=utcnow()) == Replayed(4, disabled=False)
    with engine.connect() as conn:
        oldest = health_by_subscription(conn, sub.id)[sub.id].oldest_pending_at
    assert oldest is not None
    assert utcnow() - oldest < timedelta(minutes=1)
    receiver.status = 500
    assert sender.run_once().retrying == 1
    assert {s.state for s in sends(db)} == {SendState.PENDING}
