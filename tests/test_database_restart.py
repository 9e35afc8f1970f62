"""The first requests after the database lost every connection (a restart, a failover)
succeed: a pooled connection idle for a while is pinged before use."""

from __future__ import annotations

import json
import time

import pytest
from flask import Flask
from sqlalchemy import Engine, text

from manager.db import PING_AFTER_IDLE

from .conftest import callback

pytestmark = pytest.mark.postgres


def kill_other_connections(engine: Engine) -> int:
    """What a restart does to the app's pooled connections: end every other backend."""
    with engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
        conn.commit()
    return int(killed)


def test_the_first_requests_after_the_connections_died_succeed(
    app: Flask, auth: dict[str, str], migrated_engine: Engine
) -> None:
    client = app.test_client()
    body = json.dumps(callback(task_id="r-1", user_id="owner-1", sequence=1))
    # Warm both pools: the ORM's (API) and the autocommit one (callbacks).
    assert client.get("/api/tasks", headers=auth).status_code == 200
    assert (
        client.post("/callbacks/zego", data=body, content_type="application/json").json["verdict"]
        == "applied"
    )
    assert kill_other_connections(migrated_engine) >= 2
    time.sleep(PING_AFTER_IDLE + 0.2)  # the restart: nobody could use the pool meanwhile
    assert client.get("/api/tasks", headers=auth).status_code == 200
    later = json.dumps(callback(task_id="r-2", user_id="owner-1", sequence=1))
    answer = client.post("/callbacks/zego", data=later, content_type="application/json")
    assert answer.status_code == 200, answer.data
    assert answer.json["verdict"] == "applied"
