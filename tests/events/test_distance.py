"""The outbound events with PostgreSQL 25 ms away and a receiver that takes 100 ms to
answer: written with each change through the far database, then sent by the sender's
own loop (run_forever), every event once and in order."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from flask import Flask
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines
from manager.config import Settings
from manager.events.secrets import Sealer
from manager.events.sender import EventSender

from ..conftest import callback
from ..test_distance import far_database
from .conftest import FAST, KEY, pending, subscribe
from .receiver import Receiver

pytestmark = pytest.mark.postgres
TASKS = 30


def test_events_flow_in_order_with_the_database_far_and_the_receiver_slow(
    app: Flask, receiver: Receiver, settings: Settings, db: Session
) -> None:
    subscribe(app, receiver)
    receiver.delay = 0.1
    with far_database(settings) as (far_url, proxy):
        far = create_app(replace(settings, database_url=far_url))
        client = far.test_client()
        t = int(time.time()) - 60
        for n in range(TASKS):
            for body in (
                callback(task_id=f"f{n}", sequence=1, timestamp=t),
                callback(task_id=f"f{n}", sequence=2, status="TranscodeUpdated", timestamp=t + 1),
                callback("transcode_stop", task_id=f"f{n}", sequence=3, timestamp=t + 2),
            ):
                assert client.post("/callbacks/zego", json=body).json["verdict"] == "applied"
        sender = EventSender(
            far.extensions["manager.engine"], Sealer((KEY,)), threads=16, timeout=2, policy=FAST
        )
        stop = threading.Event()
        loop = threading.Thread(target=sender.run_forever, args=(stop,))
        started = time.monotonic()
        loop.start()
        try:
            deadline = time.monotonic() + 120
            while pending(app):
                assert time.monotonic() < deadline, f"{pending(app)} still pending"
                time.sleep(0.05)
            took = time.monotonic() - started
        finally:
            stop.set()
            loop.join(timeout=30)
            dispose_engines(far)
        assert proxy.relayed > 0
    assert receiver.refused == 0
    assert len(receiver.received) == TASKS * 4
    for n in range(TASKS):
        versions = [r.version for r in receiver.received if r.task["task_id"] == f"f{n}"]
        assert versions == [1, 2, 3, 4]
    print(f"{TASKS * 4} events in {took:.1f} s ({TASKS * 4 / took:.0f}/s)")
