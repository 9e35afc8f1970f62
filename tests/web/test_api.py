"""Operator API: bearer tokens, task listing and task detail."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import ApiToken

from ..conftest import callback


def deliver(client: FlaskClient, *args: str, **kw: object) -> None:
    body = callback(*args, **kw)  # type: ignore[arg-type]
    response = client.post(
        "/callbacks/zego", data=json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 200


def test_missing_unknown_and_malformed_tokens_are_401(client: FlaskClient) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
    ):
        response = client.get("/api/tasks", headers=headers)
        assert response.status_code == 401
        assert response.json["error"]["code"] == "unauthorized"


def test_revoked_token_is_401(
    client: FlaskClient, runner: FlaskCliRunner, auth: dict[str, str]
) -> None:
    assert client.get("/api/tasks", headers=auth).status_code == 200
    result = runner.invoke(args=["tokens", "revoke", "ops-alice"])
    assert result.exit_code == 0, result.output
    assert client.get("/api/tasks", headers=auth).status_code == 401


def test_tokens_are_stored_hashed_and_listed_without_secret(
    runner: FlaskCliRunner, token: str, db: Session
) -> None:
    stored = db.execute(select(ApiToken)).scalar_one()
    assert token not in (stored.token_hash, stored.name)
    assert len(stored.token_hash) == 64
    listing = runner.invoke(args=["tokens", "list"])
    assert "ops-alice" in listing.output
    assert token not in listing.output
    assert "active" in listing.output


def test_token_names_are_unique_and_revoke_needs_a_known_name(
    runner: FlaskCliRunner, token: str
) -> None:
    again = runner.invoke(args=["tokens", "create", "ops-alice"])
    assert again.exit_code != 0
    assert "already exists" in again.output
    unknown = runner.invoke(args=["tokens", "revoke", "nobody"])
    assert unknown.exit_code != 0


def test_the_workers_name_cannot_be_a_tokens(runner: FlaskCliRunner) -> None:
    """Stop requests carry their token's name, and "worker" marks the re-stops."""
    reserved = runner.invoke(args=["tokens", "create", "worker"])
    assert reserved.exit_code != 0
    assert "reserved" in reserved.output


def test_use_is_noted(client: FlaskClient, auth: dict[str, str], db: Session) -> None:
    client.get("/api/tasks", headers=auth)
    assert db.execute(select(ApiToken.last_used_at)).scalar_one() is not None


def test_a_stale_token_used_by_many_requests_at_once_lets_them_all_in(
    app: Flask, auth: dict[str, str], db: Session
) -> None:
    """Each request reads the token, then notes its use in a write of its own: on SQLite a
    read that turned into a write would fail (SQLITE_BUSY) once another writer came first."""
    db.execute(update(ApiToken).values(last_used_at=utcnow() - timedelta(hours=1)))
    db.commit()
    barrier = threading.Barrier(8)

    def list_tasks(_: int) -> int:
        with app.test_client() as client:
            barrier.wait(timeout=30)
            return client.get("/api/tasks", headers=auth).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(list_tasks, range(8)))
    assert statuses == [200] * 8
    db.rollback()
    noted = db.execute(select(ApiToken.last_used_at)).scalar_one()
    assert noted is not None
    assert utcnow() - noted < timedelta(minutes=1)


def test_list_filters_and_paginates(client: FlaskClient, auth: dict[str, str]) -> None:
    for i in range(5):
        deliver(client, task_id=f"t{i}", user_id="alice" if i % 2 else "bob", sequence=1)
    deliver(client, "transcode_stop", task_id="t0", sequence=2)

    everything = client.get("/api/tasks", headers=auth).json
    assert [t["task_id"] for t in everything["tasks"]] == ["t4", "t3", "t2", "t1", "t0"]
    assert everything["next_cursor"] is None

    running = client.get("/api/tasks?status=running&owner=bob", headers=auth).json
    assert [t["task_id"] for t in running["tasks"]] == ["t4", "t2"]

    page1 = client.get("/api/tasks?limit=2", headers=auth).json
    page2 = client.get(f"/api/tasks?limit=2&cursor={page1['next_cursor']}", headers=auth).json
    page3 = client.get(f"/api/tasks?limit=2&cursor={page2['next_cursor']}", headers=auth).json
    seen = [t["task_id"] for p in (page1, page2, page3) for t in p["tasks"]]
    assert seen == ["t4", "t3", "t2", "t1", "t0"]
    assert page3["next_cursor"] is None

    future = int(time.time()) + 3600
    assert client.get(f"/api/tasks?since={future}", headers=auth).json["tasks"] == []
    assert len(client.get("/api/tasks?until=2999-01-01T00:00:00Z", headers=auth).json["tasks"]) == 5


def test_bad_parameters_are_400_naming_them(client: FlaskClient, auth: dict[str, str]) -> None:
    for query, name in [
        ("status=sleeping", "status"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("since=yesterday", "since"),
        ("until=2020-13-45", "until"),
        ("cursor=!!!", "cursor"),
    ]:
        response = client.get(f"/api/tasks?{query}", headers=auth)
        assert response.status_code == 400, query
        assert name in response.json["error"]["message"]


def test_task_detail_has_state_and_history(client: FlaskClient, auth: dict[str, str]) -> None:
    deliver(client, task_id="d-1", user_id="owner", sequence=1)
    deliver(client, task_id="d-1", sequence=0, status="TranscodeUpdated")  # stale
    response = client.get("/api/tasks/d-1", headers=auth)
    assert response.status_code == 200
    body = response.json
    assert body["task"]["status"] == "running"
    assert body["task"]["owner"] == "owner"
    assert [d["verdict"] for d in body["deliveries"]] == ["stale", "applied"]
    assert body["stop_requests"] == []
    assert [(r["run"], r["owner"], r["ended"]) for r in body["runs"]] == [(1, "owner", None)]


def test_unknown_task_is_404(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.get("/api/tasks/nope", headers=auth)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "unknown_task"
