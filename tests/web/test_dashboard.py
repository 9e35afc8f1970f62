"""The operator dashboard at /: sign in with a token, see tasks, stop them."""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import StopRequest, Task, TaskRun
from manager.web.charts import daily_chart, nice_ticks
from manager.web.dashboard import chart_days, format_age
from manager.zego.fake import Failure
from manager.zego.fake_server import FakeServer

from ..conftest import callback


def send(client: FlaskClient, body: dict[str, object]) -> int:
    response = client.post(
        "/callbacks/zego", data=json.dumps(body), content_type="application/json"
    )
    return response.status_code


def start(client: FlaskClient, task_id: str = "d-1", owner: str = "owner-1", seq: int = 3) -> None:
    assert send(client, callback(task_id=task_id, user_id=owner, sequence=seq)) == 200


def csrf(client: FlaskClient) -> str:
    client.get("/")
    with client.session_transaction() as session:
        token: str = session["csrf"]
    return token


def sign_in(client: FlaskClient, token: str) -> str:
    """Sign in through the form; returns the page it lands on."""
    response = client.post(
        "/login", data={"token": token, "csrf": csrf(client)}, follow_redirects=True
    )
    assert response.status_code == 200
    return response.get_data(as_text=True)


def press_stop(client: FlaskClient, task_id: str) -> str:
    response = client.post(
        "/stop", data={"task_id": task_id, "csrf": csrf(client)}, follow_redirects=True
    )
    assert response.status_code == 200
    return response.get_data(as_text=True)


def section(page: str, name: str) -> str:
    match = re.search(rf'<section class="card" id="{name}">(.*?)</section>', page, re.S)
    assert match, f"no section {name}"
    return match.group(1)


# -- signing in and out --------------------------------------------------------------------


def test_signed_out_sees_only_the_sign_in_form(client: FlaskClient) -> None:
    start(client)
    response = client.get("/")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'name="token"' in page
    assert "d-1" not in page
    assert "no-store" in response.headers["Cache-Control"]
    assert "script-src" not in response.headers["Content-Security-Policy"]  # default 'none'
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_sign_in_keeps_only_the_token_name(client: FlaskClient, token: str) -> None:
    page = sign_in(client, token)
    assert "Signed in as <strong>ops-alice</strong>" in page
    assert "Running tasks" in page
    with client.session_transaction() as session:
        assert session["operator"] == "ops-alice"
        assert token not in json.dumps(dict(session))
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert token not in cookie.value


def test_a_bad_token_does_not_sign_in(client: FlaskClient, token: str) -> None:
    page = sign_in(client, "mgr_not-a-real-token")
    assert "not valid" in page
    assert 'name="token"' in page
    with client.session_transaction() as session:
        assert "operator" not in session


def test_a_revoked_token_cannot_sign_in(
    client: FlaskClient, runner: FlaskCliRunner, token: str
) -> None:
    assert runner.invoke(args=["tokens", "revoke", "ops-alice"]).exit_code == 0
    assert "not valid" in sign_in(client, token)


def test_revoking_the_token_signs_its_sessions_out(
    client: FlaskClient, runner: FlaskCliRunner, token: str, fake_zego: FakeServer
) -> None:
    start(client)
    fake_zego.fake.seed("d-1", "owner-1", sequence=3, notify=False)
    sign_in(client, token)
    form = {"task_id": "d-1", "csrf": csrf(client)}
    assert runner.invoke(args=["tokens", "revoke", "ops-alice"]).exit_code == 0
    page = client.post("/stop", data=form, follow_redirects=True).get_data(as_text=True)
    assert "no longer active" in page
    assert 'name="token"' in page
    assert fake_zego.fake.calls == []
    with client.session_transaction() as session:
        assert "operator" not in session


def test_sign_out(client: FlaskClient, token: str) -> None:
    sign_in(client, token)
    response = client.post("/logout", data={"csrf": csrf(client)}, follow_redirects=True)
    page = response.get_data(as_text=True)
    assert "Signed out." in page
    assert 'name="token"' in page
    with client.session_transaction() as session:
        assert "operator" not in session


# -- CSRF ----------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [None, "", "forged", "é" * 43])
def test_posts_without_the_session_csrf_token_are_refused(
    client: FlaskClient, token: str, fake_zego: FakeServer, given: str | None
) -> None:
    start(client)
    fake_zego.fake.seed("d-1", "owner-1", sequence=3, notify=False)
    sign_in(client, token)
    extra = {} if given is None else {"csrf": given}
    for path, data in [
        ("/stop", {"task_id": "d-1"}),
        ("/logout", {}),
        ("/login", {"token": token}),
    ]:
        response = client.post(path, data={**data, **extra})
        assert response.status_code == 400
        assert "That form has expired" in response.get_data(as_text=True)
    assert fake_zego.fake.calls == []
    with client.session_transaction() as session:
        assert session["operator"] == "ops-alice"


def test_a_fresh_client_cannot_post_the_login_form(client: FlaskClient, token: str) -> None:
    assert client.post("/login", data={"token": token, "csrf": "x"}).status_code == 400


# -- the page ------------------------------------------------------------------------------


def test_page_shows_running_stopping_stuck_and_deliveries(
    client: FlaskClient, token: str, db: Session
) -> None:
    start(client, "run-1", "alice", 3)
    start(client, "run-2", "bob", 7)
    start(client, "old-1", "carol", 1)
    start(client, "done-1", "dave", 1)
    start(client, "slow-1", "erin", 1)
    assert send(client, callback("transcode_stop", task_id="done-1", user_id="dave", sequence=2))
    assert send(client, callback(task_id="run-1", user_id="alice", sequence=3)) == 200  # dup
    assert (
        send(
            client,
            callback(task_id="run-1", user_id="alice", sequence=2, status="TranscodeUpdated"),
        )
        == 200
    )  # stale
    assert send(client, callback(task_id="x", secret="wrong-secret-000000")) == 401
    db.execute(
        update(Task)
        .where(Task.task_id == "old-1")
        .values(last_delivery_at=utcnow() - timedelta(days=2))
    )
    db.execute(update(Task).where(Task.task_id == "run-2").values(status="stopping"))
    db.execute(
        update(Task)
        .where(Task.task_id == "slow-1")
        .values(status="stopping", updated_at=utcnow() - timedelta(minutes=10))
    )
    db.commit()

    page = sign_in(client, token)
    running = section(page, "running")
    assert "run-1" in running
    assert "alice" in running
    assert "old-1" in running
    assert "done-1" not in running
    assert "run-2" not in running
    assert running.count(">Stop</button>") == 2
    assert "slow-1" in section(page, "stopping")
    stopping = section(page, "stopping")
    assert "run-2" in stopping
    assert "bob" in stopping
    assert ">Stop</button>" not in stopping
    stuck = section(page, "stuck")
    assert "old-1" in stuck
    assert "slow-1" in stuck
    assert "run-1" not in stuck
    assert "run-2" not in stuck
    assert "2 d" in stuck
    assert "no callback" in stuck
    assert "10 min" in stuck
    assert "no stop callback" in stuck
    deliveries = section(page, "deliveries")
    for verdict, css in [
        ("applied", "ok"),
        ("duplicate", "muted"),
        ("stale", "warn"),
        ("rejected", "bad"),
    ]:
        assert f'<span class="pill {css}">{verdict}</span>' in deliveries
    assert "transcode_stop" in deliveries
    assert re.search(r'<td class="num">1</td>', deliveries)
    assert "<svg" in section(page, "chart")
    assert "2 running" in re.sub(r"</?strong>", "", page)


def test_task_ids_and_owners_are_escaped(client: FlaskClient, token: str) -> None:
    evil = "<script>alert(1)</script>"
    start(client, evil, '"><img src=x onerror=alert(2)>', 2)
    page = sign_in(client, token)
    assert "<script>" not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in page


# -- stopping from the page ----------------------------------------------------------------


def test_stop_button_stops_the_task(
    client: FlaskClient, token: str, fake_zego: FakeServer, db: Session
) -> None:
    start(client)
    fake_zego.fake.seed("d-1", "owner-1", sequence=3, notify=False)
    sign_in(client, token)
    page = press_stop(client, "d-1")
    assert "Stop sent for d-1: ZEGOCLOUD accepted it (Sequence 4)" in page
    assert "d-1" in section(page, "stopping")
    assert "d-1" not in section(page, "running")
    assert "ops-alice" in section(page, "stopping")
    assert fake_zego.fake.tasks["d-1"].stops == [4]
    stop = db.execute(select(StopRequest)).scalar_one()
    assert (stop.state, stop.requested_by, stop.user_id) == ("succeeded", "ops-alice", "owner-1")
    assert db.execute(select(Task.status)).scalar_one() == "stopping"

    again = press_stop(client, "d-1")
    assert "already stopping" in again
    assert fake_zego.fake.tasks["d-1"].stops == [4]


def test_a_refused_stop_says_zegos_code(
    client: FlaskClient, token: str, fake_zego: FakeServer, db: Session
) -> None:
    start(client)
    fake_zego.fake.seed("d-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=110200160))
    sign_in(client, token)
    page = press_stop(client, "d-1")
    assert "ZEGOCLOUD refused the stop for d-1 (ZEGOCLOUD code 110200160" in page
    assert 'class="flash error"' in page
    assert "d-1" in section(page, "running")


def test_a_retryable_answer_is_queued(
    client: FlaskClient, token: str, fake_zego: FakeServer
) -> None:
    start(client)
    fake_zego.fake.seed("d-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=110200151))
    sign_in(client, token)
    page = press_stop(client, "d-1")
    assert "queued for retry (ZEGOCLOUD code 110200151" in page
    assert 'class="flash warn"' in page


@pytest.mark.parametrize(
    ("task_id", "message"), [("ghost", "no task"), ("done-1", "already stopped")]
)
def test_stopping_an_unknown_or_ended_task_says_why(
    client: FlaskClient, token: str, fake_zego: FakeServer, task_id: str, message: str
) -> None:
    start(client, "done-1")
    assert send(client, callback("transcode_stop", task_id="done-1", sequence=4)) == 200
    sign_in(client, token)
    page = press_stop(client, task_id)
    assert f"Could not stop {task_id}" in page
    assert message in page
    assert fake_zego.fake.calls == []


@pytest.mark.parametrize("task_id", ["x" * 5000, "a\x00b"], ids=["overlong", "NUL"])
def test_a_task_id_no_column_can_hold_is_refused_before_any_lookup(
    client: FlaskClient, token: str, fake_zego: FakeServer, task_id: str
) -> None:
    sign_in(client, token)
    page = press_stop(client, task_id)
    assert "There is no such task." in page
    assert fake_zego.fake.calls == []


def test_the_stylesheet_is_served_from_the_package(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert 'href="/dashboard/static/dashboard.css"' in page
    response = client.get("/dashboard/static/dashboard.css")
    assert response.status_code == 200
    assert response.mimetype == "text/css"
    assert "http" not in response.get_data(as_text=True)  # nothing fetched from elsewhere
    response.close()


def test_stop_needs_a_signed_in_operator(client: FlaskClient, fake_zego: FakeServer) -> None:
    start(client)
    fake_zego.fake.seed("d-1", "owner-1", sequence=3, notify=False)
    page = press_stop(client, "d-1")
    assert "Please sign in" in page
    assert fake_zego.fake.calls == []


# -- the chart -----------------------------------------------------------------------------


def test_chart_days_count_starts_and_split_hours_over_days(app_db: tuple[Session, int]) -> None:
    db, task_pk = app_db
    now = datetime(2024, 5, 14, 12, 0)
    runs = [
        (datetime(2024, 5, 14, 8, 0), None),  # 4 h so far, today
        (datetime(2024, 5, 12, 22, 0), datetime(2024, 5, 13, 4, 0)),  # 2 h + 4 h
        (datetime(2024, 4, 20, 0, 0), datetime(2024, 5, 2, 0, 0)),  # started before: 24 h on 1st
        (datetime(2024, 4, 1, 0, 0), datetime(2024, 4, 2, 0, 0)),  # outside the window
    ]
    for i, (started, ended) in enumerate(runs, start=1):
        db.add(TaskRun(task_pk=task_pk, run_no=10 + i, started_at=started, ended_at=ended))
    db.add(TaskRun(task_pk=task_pk, run_no=19, started_at=None, ended_at=None))
    db.flush()
    days = chart_days(db, now)
    assert len(days) == 14
    assert days[0][0] == date(2024, 5, 1)
    assert days[-1][0] == date(2024, 5, 14)
    figures = {day.day: (started, hours) for day, started, hours in days}
    assert figures[14] == (1, 4.0)
    assert figures[13] == (0, 4.0)
    assert figures[12] == (1, 2.0)
    assert figures[1] == (0, 24.0)
    assert figures[2] == (0, 0.0)
    assert sum(started for _, started, _ in days) == 2


@pytest.fixture
def app_db(client: FlaskClient, db: Session) -> tuple[Session, int]:
    start(client, "c-1")
    return db, db.execute(select(Task.id)).scalar_one()


def test_chart_svg_has_a_bar_per_day_and_a_title() -> None:
    rows = [(date(2024, 5, 1) + timedelta(days=i), i, i * 1.5) for i in range(14)]
    svg = daily_chart(rows)
    assert svg.startswith("<svg")
    assert svg.endswith("</svg>")
    assert svg.count('<rect class="bar"') == 15  # 14 days and the legend's swatch
    assert '<title id="chart-title">Tasks started and transcoding hours per day</title>' in svg
    assert "2024-05-14: 13 tasks started, 19.5 transcoding hours" in svg
    assert "<polyline" in svg
    assert svg.count('<circle class="dot"') == 15
    assert ">14<" in svg
    # The tallest bar reaches the top tick; an empty day has no height.
    heights = [float(h) for h in re.findall(r'<rect class="bar" [^>]*height="([\d.]+)"', svg)]
    assert heights[0] == 0.0
    assert max(heights) > 100


def test_chart_escapes_its_text_and_handles_no_data() -> None:
    svg = daily_chart([(date(2024, 5, 1), 0, 0.0)], title="a < b & c")
    assert '<title id="chart-title">a &lt; b &amp; c</title>' in svg
    assert daily_chart([]).count('<rect class="bar"') == 1


@pytest.mark.parametrize(
    ("maximum", "ticks"),
    [
        (0, [0, 1]),
        (3, [0, 1, 2, 3]),
        (7, [0, 2, 4, 6, 8]),
        (42, [0, 20, 40, 60]),
        (40, [0, 10, 20, 30, 40]),
        (0.3, [0, 0.1, 0.2, 0.3]),
    ],
)
def test_nice_ticks(maximum: float, ticks: list[float]) -> None:
    assert nice_ticks(maximum) == pytest.approx(ticks)


def test_format_age() -> None:
    now = datetime(2024, 5, 14, 12, 0)
    assert format_age(now - timedelta(seconds=5), now) == "5 s"
    assert format_age(now - timedelta(minutes=12), now) == "12 min"
    assert format_age(now - timedelta(hours=3, minutes=5), now) == "3 h 5 min"
    assert format_age(now - timedelta(days=2), now) == "2 d"
    assert format_age(None, now) == "—"
