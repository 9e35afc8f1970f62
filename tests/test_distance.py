"""The callback path with PostgreSQL milliseconds away, behind a delaying proxy."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import make_url, select
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines
from manager.config import Settings
from manager.models import StopRequest, Task, TaskRun
from manager.zego.fake import FakeZego
from manager.zego.fake_server import FakeServer

from .conftest import APP_ID, CALLBACK_SECRET, SERVER_SECRET, callback
from .delay_proxy import DelayProxy
from .live import gunicorn, manager_workers

pytestmark = pytest.mark.postgres
ONE_WAY = 0.0125  # a 25 ms round trip: a database in another zone, or behind a pooler


@contextmanager
def far_database(settings: Settings) -> Iterator[tuple[str, DelayProxy]]:
    """The test database's URL as reached through the delaying proxy, and the proxy."""
    url = make_url(settings.database_url)
    with DelayProxy((url.host or "127.0.0.1", url.port or 5432), ONE_WAY) as proxy:
        yield (
            url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            proxy,
        )


@pytest.fixture
def far_app(settings: Settings) -> Iterator[tuple[Flask, DelayProxy]]:
    with far_database(settings) as (far, proxy):
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


# -- stops, with the database 25 ms away -------------------------------------------------

SMALL_RATE = 10  # calls/s: enough stops to fill many seconds, in a test of seconds


def start_tasks(client: FlaskClient, fake: FakeZego, prefix: str, count: int) -> list[str]:
    task_ids = [f"{prefix}-{i}" for i in range(count)]
    for task_id in task_ids:
        body = json.dumps(callback(task_id=task_id, user_id=f"owner-{task_id}", sequence=1))
        response = client.post("/callbacks/zego", data=body, content_type="application/json")
        assert response.json["verdict"] == "applied"
        fake.seed(task_id, f"owner-{task_id}", sequence=1, notify=False)
    return task_ids


def test_a_single_api_stop_reaches_zegocloud_within_2_s_at_25_ms(
    far_app: tuple[Flask, DelayProxy], client: FlaskClient, token: str, fake_zego: FakeServer
) -> None:
    far, proxy = far_app
    start_tasks(client, fake_zego.fake, "one", 1)
    asked = time.time()
    response = far.test_client().post(
        "/api/tasks/one-0/stop", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.json
    assert response.json["stop_request"]["state"] == "succeeded"
    [call] = fake_zego.fake.calls
    assert call["at"] - asked < 2.0
    assert proxy.relayed > 0


def test_app_processes_and_workers_25_ms_away_never_exceed_the_limit(
    settings: Settings,
    client: FlaskClient,
    token: str,
    fake_zego: FakeServer,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two app processes taking operators' stops while two workers send a bulk stop, all
    reaching PostgreSQL through the proxy: the fake, counting in a rolling second, never
    sees more than the limit, and every task is stopped exactly once."""
    fake = fake_zego.fake
    singles = start_tasks(client, fake, "op", 12)
    bulk = start_tasks(client, fake, "bulk", 48)
    monkeypatch.setattr(fake, "rate_limit", SMALL_RATE)
    with far_database(settings) as (far, _proxy):
        env = far_env(far, fake_zego)
        headers = {"Authorization": f"Bearer {token}"}
        with gunicorn(env, workers=2) as base, manager_workers(env, 2):
            queued = requests.post(
                f"{base}/api/stops", json={"task_ids": bulk}, headers=headers, timeout=30
            )
            assert queued.status_code == 202, queued.text
            with ThreadPoolExecutor(4) as pool:
                answers = list(
                    pool.map(
                        lambda t: (
                            requests.post(
                                f"{base}/api/tasks/{t}/stop", headers=headers, timeout=30
                            ).status_code
                        ),
                        singles,
                    )
                )
            assert set(answers) <= {200, 202}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(stopped(fake)) < len(singles + bulk):
                time.sleep(0.2)
    assert fake.throttled == 0
    assert SMALL_RATE - 2 <= fake.max_in_window <= SMALL_RATE  # pressed, never over
    assert stopped(fake) == dict.fromkeys(singles + bulk, 1)  # each once, none left
    db.rollback()
    states = db.execute(select(StopRequest.state)).scalars().all()
    assert states == ["succeeded"] * len(singles + bulk)


def far_env(database_url: str, fake_zego: FakeServer) -> dict[str, str]:
    """The environment of app and worker processes reaching the database at `database_url`."""
    return {
        "DATABASE_URL": database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_SERVER_SECRET": SERVER_SECRET,
        "ZEGO_CALLBACK_SECRET": CALLBACK_SECRET,
        "ZEGO_API_URL": fake_zego.url,
        "ZEGO_RATE_LIMIT": str(SMALL_RATE),
        "SECRET_KEY": "distance-test",
    }


def stopped(fake: FakeZego) -> Counter[str]:
    return Counter(
        call["task_id"]
        for call in fake.calls
        if call["action"] == "StopCloudTranscode" and call["code"] == 0
    )


def test_a_worker_killed_mid_batch_loses_nothing_and_its_units_come_back(
    settings: Settings,
    client: FlaskClient,
    token: str,
    fake_zego: FakeServer,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL one of two workers while they send a bulk stop, the database 25 ms away:
    the other takes over its units once their lease and window have passed, the fake
    never sees more than the limit, nothing is sent twice, and what the dead worker
    had claimed stays queued under its lease (to be sent when the lease ends)."""
    fake = fake_zego.fake
    bulk = start_tasks(client, fake, "kill", 60)
    monkeypatch.setattr(fake, "rate_limit", SMALL_RATE)
    with far_database(settings) as (far, _proxy):
        env = far_env(far, fake_zego)
        queued = client.post(
            "/api/stops", json={"task_ids": bulk}, headers={"Authorization": f"Bearer {token}"}
        )
        assert queued.status_code == 202, queued.json
        with manager_workers(env, 2) as (victim, survivor):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(stopped(fake)) < 15:
                time.sleep(0.05)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            db.rollback()
            left = set(
                db.execute(
                    select(Task.task_id)
                    .join(StopRequest, StopRequest.task_pk == Task.id)
                    .where(
                        StopRequest.state == "queued",
                        StopRequest.claimed_by.like(f"%:{victim.pid}"),
                    )
                ).scalars()
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(succeeded(db)) < len(bulk) - len(left):
                time.sleep(0.2)
            assert survivor.poll() is None
    assert fake.throttled == 0
    assert fake.max_in_window <= SMALL_RATE
    sent = stopped(fake)
    assert set(sent.values()) == {1}  # nothing twice
    done = succeeded(db)
    # Everything but what the dead worker held went, once; of what it held, some had
    # gone before it died (their answers lost): those wait out the lease like the rest.
    assert done == set(bulk) - left
    assert done <= set(sent) <= set(bulk)
    assert set(sent) - done <= left


def succeeded(db: Session) -> set[str]:
    db.rollback()
    return set(
        db.execute(
            select(Task.task_id)
            .join(StopRequest, StopRequest.task_pk == Task.id)
            .where(StopRequest.state == "succeeded")
        ).scalars()
    )
