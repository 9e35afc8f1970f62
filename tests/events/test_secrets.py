"""Subscriptions' secrets and SUBSCRIPTION_KEY never leave the process in clear: not in
logs, not in any answer but the one that makes a secret, not in the database, not in a
worker's output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from manager.config import Settings
from manager.db import Base

from ..conftest import APP_ID, SERVER_SECRET, callback
from .conftest import KEY, drain, sender_for
from .receiver import Receiver


def test_subscription_secrets_never_leave_the_process(
    app: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    receiver: Receiver,
    db: Session,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    made = client.post("/api/subscriptions", json={"url": receiver.url}, headers=auth)
    assert made.status_code == 201
    sub_id, first = made.json["id"], made.json["secret"]
    rotated = client.post(f"/api/subscriptions/{sub_id}/rotate-secret", headers=auth)
    assert rotated.status_code == 200
    second = rotated.json["secret"]
    receiver.secret = second

    t = int(time.time()) - 60
    client.post("/callbacks/zego", json=callback(sequence=1, timestamp=t))
    receiver.status = 500  # a failed attempt is logged too
    sender_for(app).run_once()
    receiver.status = 204
    drain(sender_for(app), app)
    assert len(receiver.received) == 1

    secrets = (first, second, KEY)
    answers = [
        client.get("/api/subscriptions", headers=auth),
        client.get(f"/api/subscriptions/{sub_id}", headers=auth),
        client.get(f"/api/subscriptions/{sub_id}/deliveries", headers=auth),
        client.post(f"/api/subscriptions/{sub_id}/disable", headers=auth),
        client.post(f"/api/subscriptions/{sub_id}/enable", headers=auth),
        client.get("/metrics"),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.request.path
        assert not any(s in answer.get_data(as_text=True) for s in secrets), answer.request.path
    assert not any(s in caplog.text for s in secrets)
    db.rollback()
    for table in Base.metadata.sorted_tables:
        dump = repr(db.execute(text(f"SELECT * FROM {table.name}")).all())  # noqa: S608
        assert not any(s in dump for s in secrets), table.name
    assert KEY not in repr(settings)

    # A worker process: its output holds no secret either.
    client.post(
        "/callbacks/zego", json=callback(sequence=2, status="TranscodeUpdated", timestamp=t)
    )
    receiver.status = 500
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": settings.database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_SERVER_SECRET": SERVER_SECRET,
        "ZEGO_API_URL": settings.zego_api_url,
        "SECRET_KEY": "k" * 32,
        "SUBSCRIPTION_KEY": KEY,
        "LOG_FORMAT": "json",
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "manager"), "worker", "--once"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "1 events sent" in done.stdout
    assert "attempt 1 failed (500)" in done.stderr
    assert not any(s in done.stdout + done.stderr for s in secrets)
