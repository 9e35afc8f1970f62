"""The callback path with PostgreSQL milliseconds away, behind a delaying proxy."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from flask import Flask
from sqlalchemy import make_url, select
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines
from manager.config import Settings
from manager.models import Task, TaskRun

from .conftest import callback
from .delay_proxy import DelayProxy

pytestmark = pytest.mark.postgres
ONE_WAY = 0.0125  # a 25 ms round trip: a database in another zone, or behind a pooler


@pytest.fixture
def far_app(settings: Settings) -> Iterator[tuple[Flask, DelayProxy]]:
    url = make_url(settings.database_url)
    with DelayProxy((url.host or "127.0.0.1", url.port or 5432), ONE_WAY) as proxy:
        far = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        app = create_app(replace(settings, database_url=far))
        yield app, proxy
        dispose_engines(app)


def test_every_callback_path_works_25_ms_away(
    far_app: tuple[Flask, DelayProxy], app: Flask, db: Session
) -> None:
    """A new task's start (one statement), an update and a stop (read, then a guarded
    write), a late update (the locked, pipelined transaction with a refold), and a
    resend: each answered after its commit, through the proxy."""
    far, proxy = far_app
    client = far.test_client()
    t0 = int(time.time()) - 100
    bodies = [
        callback(task_id="far-1", sequence=1, timestamp=t0),
        callback(task_id="far-1", sequence=3, status="TranscodeUpdated", timestamp=t0 + 9),
        callback("transcode_stop", task_id="far-1", sequence=4, timestamp=t0 + 60),
        callback(task_id="far-1", sequence=2, status="TranscodeUpdated", timestamp=t0 + 5),
        callback(task_id="far-1", sequence=1, timestamp=t0 + 1),  # a resend, new nonce
    ]
    verdicts = [
        client.post("/callbacks/zego", data=json.dumps(b), content_type="application/json").json[
            "verdict"
        ]
        for b in bodies
    ]
    assert verdicts == ["applied", "applied", "applied", "stale", "duplicate"]
    assert proxy.relayed > 0  # the database was reached through the proxy
    db.rollback()
    task = db.execute(select(Task).where(Task.task_id == "far-1")).scalar_one()
    assert (task.status, task.runs, task.state_seq) == ("stopped", 1, 4)
    assert db.execute(select(TaskRun.stop_reason)).scalars().all() == [0]
