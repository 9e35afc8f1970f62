"""On PostgreSQL: `manager worker` killed with SIGKILL while requests are in flight
loses and reorders nothing; what it had claimed goes out again, with the same
webhook-id, once its lease has run out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.config import Settings
from manager.models import Event, EventSend
from manager.vocabulary import SendState

from ..conftest import APP_ID, SERVER_SECRET, callback
from .conftest import KEY, pending, subscribe
from .receiver import Receiver

pytestmark = pytest.mark.postgres

TASKS = 60
TIMEOUT = 1.0  # --event-timeout: the lease is 2 * 1 + 5 = 7 s


def worker(settings: Settings, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": settings.database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_SERVER_SECRET": SERVER_SECRET,
        "ZEGO_API_URL": settings.zego_api_url,
        "SECRET_KEY": "k" * 32,
        "SUBSCRIPTION_KEY": KEY,
    }
    command = [str(Path(sys.executable).parent / "manager"), "worker"]
    options = ["--event-threads", "8", "--event-timeout", str(TIMEOUT)]
    return subprocess.Popen(
        command + options,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def claimed(db: Session) -> int:
    db.rollback()
    return db.execute(
        select(func.count()).where(
            EventSend.state == SendState.PENDING.value, EventSend.claimed_until > utcnow()
        )
    ).scalar_one()


def test_a_killed_worker_loses_and_reorders_nothing(
    app: Flask,
    client: FlaskClient,
    receiver: Receiver,
    db: Session,
    settings: Settings,
    tmp_path: Path,
) -> None:
    subscribe(app, receiver)
    t = int(time.time()) - 60
    for n in range(TASKS):
        for body in (
            callback(task_id=f"k{n}", sequence=1, timestamp=t),
            callback(task_id=f"k{n}", sequence=2, status="TranscodeUpdated", timestamp=t + 1),
            callback("transcode_stop", task_id=f"k{n}", sequence=3, timestamp=t + 2),
        ):
            assert client.post("/callbacks/zego", json=body).status_code == 200
    total = TASKS * 4
    receiver.delay = 0.05  # requests in flight when the kill comes

    first = worker(settings, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while len(receiver.received) < total // 3:
            assert time.monotonic() < deadline, "the first worker sent too little"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
    at_kill = len(receiver.received)
    stranded = claimed(db)
    assert stranded > 0, "the kill should leave claimed sends behind"
    assert at_kill < total

    second = worker(settings, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while pending(app):
            assert time.monotonic() < deadline, f"{pending(app)} sends still pending"
            time.sleep(0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)

    db.rollback()
    event_ids = {f"evt_{i}" for i in db.scalars(select(Event.id))}
    assert len(event_ids) == total
    assert receiver.ids() == event_ids  # nothing lost
    assert receiver.refused == 0
    for n in range(TASKS):
        arrived = [r.version for r in receiver.received if r.task["task_id"] == f"k{n}"]
        # Never an earlier version after a later one: a redelivery comes before the next.
        assert arrived == sorted(arrived), arrived
        assert sorted(set(arrived)) == [1, 2, 3, 4]
    resent = len(receiver.received) - total
    # What was in flight at the kill may have arrived and be sent again, same id.
    assert 0 <= resent <= stranded
    print(f"killed after {at_kill} of {total}; {stranded} claims stranded; {resent} resent")
