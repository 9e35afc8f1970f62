"""A task's runs, as GET /api/tasks/<id>, `manager tasks --task` and the task page show them.

Most tests write the tasks and task_runs rows directly, so that the exact shapes do not
depend on the ordering rules that derive runs from callbacks; one test goes through the
webhook end to end.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy.orm import Session

from manager.callbacks.rules import Ending
from manager.clock import utcnow
from manager.models import Task, TaskRun
from manager.tasks.shapes import run_end, run_seconds
from manager.zego.fake_server import FakeServer

from ..conftest import APP_ID, callback

T = datetime(2024, 5, 14, 12, 0, 0)


@dataclass(frozen=True)
class Run:
    started_at: datetime | None
    ended_at: datetime | None = None
    stop_reason: int | None = None
    owner: str | None = "alice"


def add_task(
    db: Session, task_id: str, runs: dict[int, Run], status: str = "running", app_id: int = APP_ID
) -> None:
    """A task and its task_runs rows, written as the lifecycle would leave them."""
    latest = runs[max(runs)] if runs else Run(None)
    values: dict[str, object] = {
        "app_id": app_id,
        "task_id": task_id,
        "owner": "alice",
        "status": status,
        "stop_reason": latest.stop_reason,
        "state_seq": len(runs),
        "state_rank": 1,
        "max_seq": len(runs),
        "runs": len(runs),
        "started_at": latest.started_at,
        "ended_at": latest.ended_at,
        "first_seen_at": T - timedelta(days=1),
        "updated_at": T,
        "last_delivery_at": T,
    }
    for column in Task.__table__.columns:
        # Whatever other ordering registers the schema has: their floor. No reader here
        # looks at them, and so these rows do not depend on how the rules keep them.
        if not (column.nullable or column.primary_key or column.default or column.key in values):
            values[column.key] = 0
    task = Task(**values)
    db.add(task)
    db.flush()
    for run_no, run in runs.items():  # in the order given: the API sorts them
        db.add(
            TaskRun(
                task_pk=task.id,
                run_no=run_no,
                owner=run.owner,
                started_at=run.started_at,
                ended_at=run.ended_at,
                stop_reason=run.stop_reason,
            )
        )
    db.commit()


def get_task(client: FlaskClient, auth: dict[str, str], task_id: str) -> dict[str, Any]:
    response = client.get(f"/api/tasks/{task_id}", headers=auth)
    assert response.status_code == 200, response.json
    body: dict[str, Any] = response.json
    return body


# -- the rules, without a database ---------------------------------------------------------


NOW = T + timedelta(hours=5)


@pytest.mark.parametrize(
    ("run", "end", "seconds"),
    [
        (Run(T, T + timedelta(hours=1), 0), Ending.STOPPED, 3600),
        (Run(T, T + timedelta(seconds=9), 1), Ending.FAILED, 9),
        (Run(T, T + timedelta(minutes=2)), Ending.UNSEEN, 120),
        (Run(None, T, 0), Ending.STOPPED, None),
        (Run(None, T), Ending.UNSEEN, None),
        (Run(T), None, 5 * 3600),
        (Run(None), None, None),
        (Run(T, T - timedelta(seconds=30), 0), Ending.STOPPED, 0),  # never negative
        (Run(NOW + timedelta(seconds=40)), None, 0),  # a start ahead of our clock
        (Run(T, T + timedelta(seconds=1, microseconds=500_000), 0), Ending.STOPPED, 2),
        (Run(T, T + timedelta(seconds=1, microseconds=499_999), 0), Ending.STOPPED, 1),
    ],
)
def test_how_a_run_ended_and_its_seconds(run: Run, end: Ending | None, seconds: int | None) -> None:
    row = TaskRun(started_at=run.started_at, ended_at=run.ended_at, stop_reason=run.stop_reason)
    assert run_end(row) == end
    assert run_seconds(row, NOW) == seconds


# -- GET /api/tasks/<task_id> --------------------------------------------------------------


def test_two_runs_one_stopped_one_still_going(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    started = utcnow().replace(microsecond=0) - timedelta(seconds=90)
    add_task(
        db,
        "h-1",
        {
            2: Run(started, owner="bob"),
            1: Run(T, T + timedelta(hours=1), 0),
        },
    )
    before = utcnow()
    body = get_task(client, auth, "h-1")
    after = utcnow()
    runs = body["runs"]
    assert runs[0] == {
        "run": 1,
        "owner": "alice",
        "started_at": "2024-05-14T12:00:00Z",
        "ended_at": "2024-05-14T13:00:00Z",
        "ended": "stopped",
        "seconds": 3600,
    }
    going = runs[1]
    assert {k: v for k, v in going.items() if k != "seconds"} == {
        "run": 2,
        "owner": "bob",
        "started_at": started.isoformat() + "Z",
        "ended_at": None,
        "ended": None,
    }
    low, high = ((t - started).total_seconds() for t in (before, after))
    assert round(low) <= going["seconds"] <= round(high) + 1
    # The rest of the answer is as before.
    assert set(body) == {"task", "runs", "deliveries", "stop_requests"}
    assert body["task"]["runs"] == 2


def test_failed_and_unseen_ends_and_an_unknown_start(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    add_task(
        db,
        "h-2",
        {
            1: Run(T, T + timedelta(minutes=10)),  # a later start showed it had ended
            2: Run(T + timedelta(minutes=10), T + timedelta(minutes=11), 1),
            3: Run(None, T + timedelta(hours=2), 0),  # only its stop came
        },
        status="stopped",
    )
    runs = get_task(client, auth, "h-2")["runs"]
    assert runs == [
        {
            "run": 1,
            "owner": "alice",
            "started_at": "2024-05-14T12:00:00Z",
            "ended_at": "2024-05-14T12:10:00Z",
            "ended": "unseen",
            "seconds": 600,
        },
        {
            "run": 2,
            "owner": "alice",
            "started_at": "2024-05-14T12:10:00Z",
            "ended_at": "2024-05-14T12:11:00Z",
            "ended": "failed",
            "seconds": 60,
        },
        {
            "run": 3,
            "owner": "alice",
            "started_at": None,
            "ended_at": "2024-05-14T14:00:00Z",
            "ended": "stopped",
            "seconds": None,
        },
    ]


def test_an_end_before_the_start_is_zero_seconds(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    add_task(db, "h-3", {1: Run(T, T - timedelta(seconds=5), 0)}, status="stopped")
    assert get_task(client, auth, "h-3")["runs"] == [
        {
            "run": 1,
            "owner": "alice",
            "started_at": "2024-05-14T12:00:00Z",
            "ended_at": "2024-05-14T11:59:55Z",
            "ended": "stopped",
            "seconds": 0,
        }
    ]


def test_runs_of_a_task_id_with_slashes_and_no_runs_at_all(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    add_task(db, "/room/7/cam", {1: Run(T, T + timedelta(seconds=30), 0)}, status="stopped")
    add_task(db, "bare", {})
    assert [r["run"] for r in get_task(client, auth, "/room/7/cam")["runs"]] == [1]
    assert get_task(client, auth, "bare")["runs"] == []


def test_another_apps_task_and_an_unknown_one_are_404(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    add_task(db, "elsewhere", {1: Run(T)}, app_id=APP_ID + 1)
    for task_id in ("elsewhere", "nope"):
        response = client.get(f"/api/tasks/{task_id}", headers=auth)
        assert response.status_code == 404
        assert response.json["error"]["code"] == "unknown_task"


def test_runs_need_a_token(client: FlaskClient, db: Session) -> None:
    add_task(db, "h-4", {1: Run(T)})
    response = client.get("/api/tasks/h-4")
    assert response.status_code == 401
    assert "runs" not in response.json


def test_runs_from_callbacks(client: FlaskClient, auth: dict[str, str]) -> None:
    """End to end: start, stop and a new start; a start whose run's stop never came; a
    stop whose start never came."""
    t0 = int(time.time()) - 200

    def deliver(event: str = "transcode_start", **kw: object) -> None:
        body = callback(event, **kw)  # type: ignore[arg-type]
        response = client.post(
            "/callbacks/zego", data=json.dumps(body), content_type="application/json"
        )
        assert response.status_code == 200, response.json

    deliver(task_id="cb-1", sequence=1, timestamp=t0)
    deliver("transcode_stop", task_id="cb-1", sequence=2, timestamp=t0 + 60)
    deliver(task_id="cb-1", sequence=3, timestamp=t0 + 100)
    deliver(task_id="cb-2", sequence=1, timestamp=t0)
    deliver(task_id="cb-2", sequence=5, timestamp=t0 + 30)
    deliver("transcode_stop", task_id="cb-3", sequence=4, stop_reason=1, timestamp=t0 + 10)

    one = get_task(client, auth, "cb-1")["runs"]
    assert [(r["run"], r["ended"]) for r in one] == [(1, "stopped"), (2, None)]
    assert one[0]["seconds"] == 60
    assert one[1]["seconds"] >= 100
    two = get_task(client, auth, "cb-2")["runs"]
    assert [(r["run"], r["ended"]) for r in two] == [(1, "unseen"), (2, None)]
    assert two[0]["seconds"] == 30
    three = get_task(client, auth, "cb-3")["runs"]
    assert [(r["started_at"], r["ended"], r["seconds"]) for r in three] == [(None, "failed", None)]


# -- manager tasks --task ----------------------------------------------------------------


def test_cli_prints_the_state_and_a_table_of_runs(runner: FlaskCliRunner, db: Session) -> None:
    add_task(
        db,
        "c/1",
        {
            1: Run(T, T + timedelta(hours=1), 0),
            2: Run(T + timedelta(hours=2), T + timedelta(hours=3)),
            3: Run(None, T + timedelta(hours=4), 1),
            4: Run(T + timedelta(hours=5), owner="bob"),
        },
    )
    result = runner.invoke(args=["tasks", "--task", "c/1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["task_id", "c/1"]
    assert "status            running" in lines
    assert "runs              4" in lines
    header = lines.index(next(line for line in lines if line.startswith("run ")))
    assert lines[header].split() == ["run", "owner", "started_at", "ended_at", "ended", "seconds"]
    rows = [line.split() for line in lines[header + 2 :]]
    assert rows[0] == [
        "1",
        "alice",
        "2024-05-14T12:00:00Z",
        "2024-05-14T13:00:00Z",
        "stopped",
        "3600",
    ]
    assert rows[1] == [
        "2",
        "alice",
        "2024-05-14T14:00:00Z",
        "2024-05-14T15:00:00Z",
        "unseen",
        "3600",
    ]
    assert rows[2] == ["3", "alice", "unknown", "2024-05-14T16:00:00Z", "failed"]
    assert rows[3][:4] == ["4", "bob", "2024-05-14T17:00:00Z", "running"]
    assert int(rows[3][4]) > 0


def test_cli_json_is_the_apis_task_and_runs(
    client: FlaskClient, runner: FlaskCliRunner, auth: dict[str, str], db: Session
) -> None:
    add_task(db, "c-2", {1: Run(T, T + timedelta(minutes=1), 0), 2: Run(None, T, 1)}, "failed")
    result = runner.invoke(args=["tasks", "--task", "c-2", "--format", "json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    api = get_task(client, auth, "c-2")
    assert body == {"task": api["task"], "runs": api["runs"]}


def test_cli_unknown_task_is_an_error_not_a_traceback(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["tasks", "--task", "ghost"])
    assert result.exit_code == 1
    assert "Error: no task 'ghost'" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_task_takes_no_list_filters(runner: FlaskCliRunner, db: Session) -> None:
    add_task(db, "c-3", {1: Run(T)})
    result = runner.invoke(args=["tasks", "--task", "c-3", "--status", "running"])
    assert result.exit_code == 2
    assert "--task" in result.output


def test_cli_task_with_no_runs(runner: FlaskCliRunner, db: Session) -> None:
    add_task(db, "c-4", {})
    result = runner.invoke(args=["tasks", "--task", "c-4"])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("no runs yet")


# -- the task page -------------------------------------------------------------------------


def csrf(client: FlaskClient) -> str:
    client.get("/")
    with client.session_transaction() as session:
        token: str = session["csrf"]
    return token


def sign_in(client: FlaskClient, token: str) -> None:
    response = client.post("/login", data={"token": token, "csrf": csrf(client)})
    assert response.status_code == 302


def section(page: str, name: str) -> str:
    match = re.search(rf'<section class="card" id="{name}">(.*?)</section>', page, re.S)
    assert match, f"no section {name}"
    return match.group(1)


def rows(html: str) -> list[list[str]]:
    """The table's body rows as lists of cell texts, tags stripped."""
    body = html.split("<tbody>", 1)[1]
    return [
        [
            re.sub(r"<[^>]+>", "", cell).strip()
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)
    ]


def test_the_task_page_shows_every_run(client: FlaskClient, token: str, db: Session) -> None:
    started = utcnow().replace(microsecond=0) - timedelta(minutes=3)
    add_task(
        db,
        "p-1",
        {
            1: Run(T, T + timedelta(hours=1), 0),
            2: Run(T + timedelta(hours=2), T + timedelta(hours=2, minutes=5)),
            3: Run(None, T + timedelta(hours=3), 1),
            4: Run(started, owner="bob"),
        },
    )
    sign_in(client, token)
    response = client.get("/tasks/p-1")
    assert response.status_code == 200
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert "<script" not in response.get_data(as_text=True)
    page = response.get_data(as_text=True)
    assert "p-1" in section(page, "task")
    table = rows(section(page, "runs"))
    assert table == [  # newest first
        ["4", "bob", started.strftime("%Y-%m-%d %H:%M:%S"), "—", "running", "3 min so far"],
        ["3", "alice", "unknown", "2024-05-14 15:00:00", "failed", "—"],
        ["2", "alice", "2024-05-14 14:00:00", "2024-05-14 14:05:00", "ended unseen", "5 min"],
        ["1", "alice", "2024-05-14 12:00:00", "2024-05-14 13:00:00", "stopped", "1 h"],
    ]


def test_the_task_lists_link_to_the_task_page(client: FlaskClient, token: str, db: Session) -> None:
    for task_id in ("plain", "a/b", "/lead", "x/../y", "."):
        add_task(db, task_id, {1: Run(T)})
    sign_in(client, token)
    page = client.get("/").get_data(as_text=True)
    running = section(page, "running")
    hrefs = set(re.findall(r'<a href="([^"]+)">', running))
    assert hrefs == {
        "/tasks/plain",
        "/tasks/a/b",
        "/tasks//lead",
        "/tasks?id=x/../y",
        "/tasks?id=.",
    }
    for href, task_id in [
        ("/tasks/plain", "plain"),
        ("/tasks/a/b", "a/b"),
        ("/tasks//lead", "/lead"),
        ("/tasks?id=x/../y", "x/../y"),
        ("/tasks?id=.", "."),
    ]:
        response = client.get(href)
        assert response.status_code == 200, href
        heading = section(response.get_data(as_text=True), "task")
        assert f'<span class="id">{task_id}</span>' in heading


def test_the_task_page_escapes_what_it_shows(client: FlaskClient, token: str, db: Session) -> None:
    evil = "<script>alert(1)</script>"
    add_task(db, evil, {1: Run(T, owner='"><img src=x onerror=alert(2)>')})
    sign_in(client, token)
    index = client.get("/").get_data(as_text=True)
    assert 'href="/tasks/%3Cscript%3Ealert(1)%3C/script%3E"' in index
    page = client.get("/tasks/%3Cscript%3Ealert(1)%3C/script%3E").get_data(as_text=True)
    assert "<script>" not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section(page, "task")
    assert "&#34;&gt;&lt;img" in section(page, "runs")


def test_an_unknown_task_page_is_a_404_page(client: FlaskClient, token: str, db: Session) -> None:
    add_task(db, "elsewhere", {1: Run(T)}, app_id=APP_ID + 1)
    sign_in(client, token)
    for path in ("/tasks/ghost", "/tasks/elsewhere", "/tasks/a%00b", "/tasks/" + "x" * 5000):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.mimetype == "text/html"
        assert "No such task" in response.get_data(as_text=True)
    assert client.get("/tasks").status_code == 302


def test_the_task_page_needs_a_signed_in_operator(client: FlaskClient, db: Session) -> None:
    add_task(db, "p-2", {1: Run(T)})
    response = client.get("/tasks/p-2")
    assert response.status_code == 302
    assert response.headers["Location"] == "/"
    page = client.get("/", follow_redirects=True).get_data(as_text=True)
    assert "p-2" not in page
    assert "Please sign in first." in page


def test_stopping_from_the_task_page_returns_there(
    client: FlaskClient, token: str, fake_zego: FakeServer
) -> None:
    body = json.dumps(callback(task_id="s/1", user_id="owner-1", sequence=3))
    assert (
        client.post("/callbacks/zego", data=body, content_type="application/json").status_code
        == 200
    )
    fake_zego.fake.seed("s/1", "owner-1", sequence=3, notify=False)
    sign_in(client, token)
    page = client.get("/tasks/s/1").get_data(as_text=True)
    assert 'name="back" value="task"' in page
    response = client.post("/stop", data={"task_id": "s/1", "back": "task", "csrf": csrf(client)})
    assert response.status_code == 302
    assert response.headers["Location"] == "/tasks/s/1"
    page = client.get("/tasks/s/1").get_data(as_text=True)
    assert "Stop sent for s/1" in page
    assert '<span class="pill stopping">stopping</span>' in page
    assert "ops-alice" in section(page, "stop-requests")
    assert fake_zego.fake.tasks["s/1"].stops == [4]
