"""Operator input on the stop paths: task ids with slashes reach their task, and text no
column can hold, an unknown ?force= spelling or an over-long reason is a 4xx (or a
click error) naming the field, and changes nothing."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.models import StopBatch, StopRequest, Task
from manager.stored_text import MAX_REASON_LENGTH
from manager.zego.fake_server import FakeServer

from ..conftest import callback

SLASHED_IDS = ["room-7/cam-2", "/lead", "a//b", "trail/", "x/stop"]


def start(client: FlaskClient, fake_zego: FakeServer, task_id: str = "s-1") -> None:
    body = json.dumps(callback(task_id=task_id, user_id="owner-1", sequence=3))
    response = client.post("/callbacks/zego", data=body, content_type="application/json")
    assert response.status_code == 200, response.json
    fake_zego.fake.seed(task_id, "owner-1", sequence=3, notify=False)


def zego_stops(fake_zego: FakeServer) -> list[dict[str, Any]]:
    return [c for c in fake_zego.fake.calls if c["action"] == "StopCloudTranscode"]


def assert_nothing_changed(db: Session, fake_zego: FakeServer) -> None:
    db.rollback()
    assert db.execute(select(func.count()).select_from(StopRequest)).scalar_one() == 0
    assert db.execute(select(func.count()).select_from(StopBatch)).scalar_one() == 0
    assert set(db.execute(select(Task.status, Task.max_seq)).all()) <= {("running", 3)}
    assert zego_stops(fake_zego) == []


def assert_json_error(response: Any, status: int, code: str, *named: str) -> None:
    assert response.status_code == status, response.data
    assert response.is_json, response.data
    assert response.json["error"]["code"] == code
    for name in named:
        assert name in response.json["error"]["message"]


# --- task ids with slashes ------------------------------------------------------------


@pytest.mark.parametrize("task_id", SLASHED_IDS)
@pytest.mark.parametrize("encode", [False, True], ids=["raw", "percent_encoded"])
def test_a_task_id_with_slashes_is_viewed_and_stopped(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, task_id: str, encode: bool
) -> None:
    start(client, fake_zego, task_id)
    path = f"/api/tasks/{quote(task_id, safe='') if encode else task_id}"
    detail = client.get(path, headers=auth)
    assert detail.status_code == 200, detail.json
    assert detail.json["task"]["task_id"] == task_id
    stopped = client.post(f"{path}/stop", json={"reason": "slashes"}, headers=auth)
    assert stopped.status_code == 200, stopped.json
    assert stopped.json["stop_request"]["task_id"] == task_id
    assert fake_zego.fake.tasks[task_id].stops == [4]
    history = client.get(path, headers=auth).json
    assert (history["task"]["status"], len(history["stop_requests"])) == ("stopping", 1)


def test_detail_and_stop_of_neighbouring_ids_are_not_confused(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer
) -> None:
    # "x/stop" is a task id; POST /api/tasks/x/stop stops task "x", not it.
    start(client, fake_zego, "x")
    start(client, fake_zego, "x/stop")
    assert client.get("/api/tasks/x/stop", headers=auth).json["task"]["task_id"] == "x/stop"
    response = client.post("/api/tasks/x/stop", headers=auth)
    assert response.json["stop_request"]["task_id"] == "x"
    assert (fake_zego.fake.tasks["x"].stops, fake_zego.fake.tasks["x/stop"].stops) == ([4], [])


def test_routes_around_task_ids_keep_their_json_errors(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    assert_json_error(client.post("/api/tasks/a/b", headers=auth), 405, "method_not_allowed")
    assert_json_error(client.put("/api/tasks/a/b/stop", headers=auth), 405, "method_not_allowed")
    assert_json_error(client.delete("/api/tasks/a", headers=auth), 405, "method_not_allowed")
    assert_json_error(client.get("/api/tasks/", headers=auth), 404, "not_found")
    assert_json_error(client.get("/api/tasks/a/stop", headers=auth), 404, "unknown_task", "a/stop")
    assert_json_error(client.post("/api/tasks/a/b/stop", headers=auth), 404, "unknown_task", "a/b")
    assert_json_error(client.get("/api/stops/7", headers=auth), 404, "unknown_batch")
    assert client.get("/api/tasks", headers=auth).json == {"tasks": [], "next_cursor": None}
    # A leading slash is part of the id, not a redirect to another task.
    assert_json_error(client.post("/api/tasks//a/stop", headers=auth), 404, "unknown_task", "/a")


# --- text no column can hold ----------------------------------------------------------

BULK = "/api/stops"
STOP = "/api/tasks/s-1/stop"
# (method, path, JSON body as text, field named, error code)
UNSTORABLE = [
    ("post", "/api/tasks/s%00x/stop", None, "task_id", "invalid_task_id"),
    ("post", "/api/tasks/s-1%00/stop", None, "task_id", "invalid_task_id"),
    ("get", "/api/tasks/s%00x", None, "task_id", "invalid_task_id"),
    ("get", "/api/tasks?owner=owner%00", None, "owner", "invalid_parameter"),
    ("post", STOP, '{"reason": "a\\u0000b"}', "reason", "invalid_body"),
    ("post", STOP, '{"reason": "a\\ud800b"}', "reason", "invalid_body"),
    ("post", BULK, '{"task_ids": ["s\\u0000"]}', "task_ids[0]", "invalid_body"),
    ("post", BULK, '{"task_ids": ["s-1", "s\\udfff"]}', "task_ids[1]", "invalid_body"),
    ("post", BULK, '{"owner": "owner-1\\u0000"}', "owner", "invalid_body"),
    ("post", BULK, '{"all_running": true, "reason": "\\u0000"}', "reason", "invalid_body"),
    ("post", BULK, '{"task_ids": ["s-1"], "reason": "\\ud83d"}', "reason", "invalid_body"),
    # An identifier follows the rule a callback's TaskId and UserId follow: no control
    # characters at all (a reason is prose, where only NUL and lone surrogates are refused).
    ("get", "/api/tasks?owner=owner%01", None, "owner", "invalid_parameter"),
    ("post", BULK, '{"task_ids": ["s-1", "s\\n2"]}', "task_ids[1]", "invalid_body"),
]
IDENTIFIER_RULE = "must be UTF-8 text without control characters"
PROSE_RULE = "must not contain NUL"


@pytest.mark.parametrize(("method", "path", "body", "name", "code"), UNSTORABLE)
def test_unstorable_text_is_400_naming_the_field(
    client: FlaskClient,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
    method: str,
    path: str,
    body: str | None,
    name: str,
    code: str,
) -> None:
    start(client, fake_zego)
    response = client.open(
        path, method=method.upper(), data=body, content_type="application/json", headers=auth
    )
    rule = PROSE_RULE if name == "reason" else IDENTIFIER_RULE
    assert_json_error(response, 400, code, f"{name} {rule}")
    assert_nothing_changed(db, fake_zego)


@pytest.mark.parametrize("path", [STOP, BULK])
def test_a_reason_over_the_limit_is_400_and_at_the_limit_is_kept(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, db: Session, path: str
) -> None:
    start(client, fake_zego)
    body: dict[str, Any] = {"task_ids": ["s-1"]} if path == BULK else {}
    too_long = client.post(path, json={**body, "reason": "x" * 501}, headers=auth)
    assert_json_error(too_long, 400, "invalid_body", f"reason must be at most {MAX_REASON_LENGTH}")
    assert_nothing_changed(db, fake_zego)
    at_limit = client.post(path, json={**body, "reason": "é" * 500}, headers=auth)
    assert at_limit.status_code in (200, 202), at_limit.json
    db.rollback()
    assert db.execute(select(StopRequest.reason)).scalar_one() == "é" * 500


def test_text_a_column_can_hold_is_accepted(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, db: Session
) -> None:
    start(client, fake_zego)
    reason = "line one\nline two\ttabbed \U0001f6d1 \u00e9"  # a pair of surrogates is fine
    response = client.post(
        STOP, data=json.dumps({"reason": reason}), content_type="application/json", headers=auth
    )
    assert response.status_code == 200, response.json
    db.rollback()
    assert db.execute(select(StopRequest.reason)).scalar_one() == reason


# --- ?force= --------------------------------------------------------------------------


def stopped_task(client: FlaskClient, fake_zego: FakeServer) -> None:
    start(client, fake_zego)
    body = json.dumps(callback("transcode_stop", task_id="s-1", sequence=4))
    response = client.post("/callbacks/zego", data=body, content_type="application/json")
    assert response.json == {"code": 0, "verdict": "applied"}
    fake_zego.fake.seed("s-1", "owner-1", sequence=4, notify=False)


@pytest.mark.parametrize("value", ["1", "true", "True", "TRUE", "yes", "YES"])
def test_force_spellings_that_force(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, value: str
) -> None:
    stopped_task(client, fake_zego)
    response = client.post(f"{STOP}?force={value}", headers=auth)
    assert response.status_code == 200, response.json
    assert response.json["stop_request"]["force"] is True


@pytest.mark.parametrize("query", ["", "?force=0", "?force=false", "?force=False", "?force=no"])
def test_force_spellings_that_do_not(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, query: str
) -> None:
    stopped_task(client, fake_zego)
    assert_json_error(client.post(f"{STOP}{query}", headers=auth), 409, "already_stopped")


@pytest.mark.parametrize("query", ["force=ture", "force=", "force", "force=2", "force=on"])
def test_other_force_values_are_400_listing_the_spellings(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, db: Session, query: str
) -> None:
    start(client, fake_zego)
    response = client.post(f"{STOP}?{query}", headers=auth)
    assert_json_error(response, 400, "invalid_parameter", "force", "true", "false")
    assert_nothing_changed(db, fake_zego)


# --- the command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named", "problem"),
    [
        (["s-1", "--reason", "x" * 600], "--reason", f"at most {MAX_REASON_LENGTH} characters"),
        (["s-1", "--reason", "a\x00b"], "--reason", "NUL"),
        (["s-1", "--reason", "a\udcffb"], "--reason", "NUL"),  # bytes that are not UTF-8
        (["s\x00x"], "TASK_ID", "control characters"),
    ],
)
def test_cli_stop_refuses_what_the_api_refuses(
    client: FlaskClient,
    runner: FlaskCliRunner,
    fake_zego: FakeServer,
    db: Session,
    args: list[str],
    named: str,
    problem: str,
) -> None:
    start(client, fake_zego)
    result = runner.invoke(args=["stop", *args])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert problem in result.output
    assert_nothing_changed(db, fake_zego)


def test_cli_stop_keeps_a_reason_at_the_limit(
    client: FlaskClient, runner: FlaskCliRunner, fake_zego: FakeServer, db: Session
) -> None:
    start(client, fake_zego)
    result = runner.invoke(args=["stop", "s-1", "--reason", "x" * MAX_REASON_LENGTH])
    assert result.exit_code == 0, result.output
    assert db.execute(select(StopRequest.reason)).scalar_one() == "x" * MAX_REASON_LENGTH


@pytest.mark.parametrize(
    "args",
    [["tasks", "--owner", "a\x00"], ["tokens", "create", "a\x00"], ["tokens", "revoke", "a\x00"]],
)
def test_cli_refuses_unstorable_text_elsewhere(runner: FlaskCliRunner, args: list[str]) -> None:
    result = runner.invoke(args=args)
    assert result.exit_code == 2, result.output
    assert IDENTIFIER_RULE in result.output


def test_a_reason_may_run_over_several_lines(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, db: Session
) -> None:
    """A reason is an operator's prose: a newline or a tab is kept as written."""
    start(client, fake_zego)
    response = client.post(STOP, json={"reason": "maintenance\n\tticket 42"}, headers=auth)
    assert response.status_code in (200, 202), response.json
    assert db.execute(select(StopRequest.reason)).scalar_one() == "maintenance\n\tticket 42"
