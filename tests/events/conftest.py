"""Fixtures for the outbound events: an app that can keep subscriptions' secrets, a
receiver, subscriptions on it, and a sender with retries fast enough for a test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.config import Settings
from manager.events.secrets import Sealer, new_key
from manager.events.sender import EventSender
from manager.events.sending import RetryPolicy
from manager.events.subscriptions import create_subscription
from manager.models import EventSend, Subscription
from manager.vocabulary import SendState

from .receiver import Receiver, serve

KEY = new_key()
FAST = RetryPolicy(first=0.01, longest=0.05)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, subscription_keys=(KEY,))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve(Receiver()) as r:
        yield r


def subscribe(app: Flask, receiver: Receiver, **options: Any) -> Subscription:
    """A subscription sending to `receiver`, whose secret the receiver then verifies with."""
    with Session(app.extensions["manager.engine"], expire_on_commit=False) as session:
        made = create_subscription(
            session, Sealer((KEY,)), url=options.pop("url", receiver.url), now=utcnow(), **options
        )
        session.commit()
    receiver.secret = made.secret
    return made.subscription


def sender_for(app: Flask, policy: RetryPolicy = FAST, threads: int = 8) -> EventSender:
    return EventSender(
        app.extensions["manager.engine"],
        Sealer((KEY,)),
        threads=threads,
        timeout=2.0,
        policy=policy,
    )


def pending(app: Flask) -> int:
    with app.extensions["manager.engine"].connect() as conn:
        return conn.execute(
            select(func.count()).where(EventSend.state == SendState.PENDING.value)
        ).scalar_one()


def drain(sender: EventSender, app: Flask, *, within: float = 60.0) -> None:
    """Send until nothing is pending (retries included)."""
    deadline = time.monotonic() + within
    while pending(app):
        if time.monotonic() >= deadline:
            with app.extensions["manager.engine"].connect() as conn:
                rows = conn.execute(
                    select(
                        EventSend.task_pk,
                        EventSend.version,
                        EventSend.attempts,
                        EventSend.next_attempt_at,
                        EventSend.claimed_until,
                    ).where(EventSend.state == SendState.PENDING.value)
                ).all()
            raise AssertionError(f"{pending(app)} sends still pending: {rows}")
        if not sender.run_once().delivered:
            time.sleep(0.02)
