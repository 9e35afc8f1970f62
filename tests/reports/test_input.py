"""Reports and task listing: absurd parameters are 4xx, CSV cells never become formulas,
and figures that bad timestamps could make nonsensical stay sensible."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy.orm import Session

from manager.models import Task, TaskRun
from manager.reports import reporting
from manager.reports.window import Window

from ..conftest import APP_ID, callback

NOW = datetime.utcnow().replace(microsecond=0)


def add_task(
    db: Session,
    task_id: str,
    owner: str | None,
    status: str,
    runs: list[tuple[datetime | None, datetime | None, int | None]],
    quiet_since: datetime,
) -> None:
    task = Task(
        app_id=APP_ID,
        task_id=task_id,
        owner=owner,
        status=status,
        state_seq=1,
        state_rank=2,
        max_seq=1,
        runs=len(runs),
        first_seen_at=quiet_since,
        updated_at=quiet_since,
        last_delivery_at=quiet_since,
    )
    db.add(task)
    db.flush()
    for n, (started, ended, reason) in enumerate(runs, start=1):
        db.add(
            TaskRun(
                task_pk=task.id,
                run_no=n,
                owner=owner,
                started_at=started,
                ended_at=ended,
                stop_reason=reason,
            )
        )
    db.commit()


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


FORMULAS = ['=HYPERLINK("http://evil.example/","click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)"]


@pytest.mark.parametrize("owner", FORMULAS)
def test_owner_ids_in_csv_are_never_formulas(
    client: FlaskClient, db: Session, auth: dict[str, str], owner: str
) -> None:
    add_task(db, "t-1", owner, "running", [(NOW - timedelta(hours=2), None, None)], NOW)
    response = client.get("/api/reports/owners?format=csv", headers=auth)
    assert response.status_code == 200
    [_header, row] = csv_rows(response.get_data(as_text=True))
    assert row[0] == "'" + owner  # shown as text, and still the whole id


def test_task_ids_in_the_stuck_csv_are_never_formulas(
    client: FlaskClient, db: Session, auth: dict[str, str]
) -> None:
    quiet = NOW - timedelta(days=3)
    add_task(db, "=1+1", "u", "running", [(quiet, None, None)], quiet)
    response = client.get("/api/reports/stuck?format=csv", headers=auth)
    [_header, row] = csv_rows(response.get_data(as_text=True))
    assert row[0] == "'=1+1"


def test_the_cli_csv_is_safe_too(runner: FlaskCliRunner, db: Session) -> None:
    add_task(db, "t-1", "=cmd", "running", [(NOW - timedelta(hours=2), None, None)], NOW)
    result = runner.invoke(args=["report", "owners", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert csv_rows(result.stdout)[1][0] == "'=cmd"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "url",
    [
        "/api/reports/owners?limit=%C2%B2",  # "²".isdigit(), but int("²") fails
        "/api/reports/stuck?silent_for=%C2%B2",
        "/api/tasks?limit=%C2%B2",
        "/api/reports/summary?since=0001-01-01T00:00:00%2B01:00",
        "/api/reports/summary?until=9999-12-31T23:59:59-01:00",
        "/api/tasks?since=0001-01-01T00:00:00%2B01:00",
        "/api/reports/daily?until=0001-01-10T00:00:00",
        "/api/reports/daily?since=9999-12-31T12:00:00&until=9999-12-31T23:59:59",
        "/api/tasks?cursor=" + _b64(b"9" * 30),
        "/api/tasks?cursor=" + _b64(b"-5"),
        "/api/reports/owners?cursor=" + _b64(json.dumps([10**30, "a", NOW.isoformat()]).encode()),
        "/api/tasks?since=2025-03-10T00:00:00&until=2025-03-09T00:00:00",
    ],
)
def test_absurd_parameters_are_a_4xx_naming_the_problem(
    client: FlaskClient, auth: dict[str, str], url: str
) -> None:
    response = client.get(url, headers=auth)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.json["error"]["code"] == "invalid_parameter"


def test_the_cli_refuses_an_absurd_window_with_a_message(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["report", "daily", "--until", "0001-01-10T00:00:00"])
    assert result.exit_code != 0
    assert "until must be from 1970-01-01" in result.output
    assert "Traceback" not in result.output


def test_a_stop_stamped_before_its_start_lasts_zero_seconds_everywhere(
    client: FlaskClient, db: Session
) -> None:
    def send(body: dict[str, Any]) -> None:
        response = client.post(
            "/callbacks/zego", data=json.dumps(body), content_type="application/json"
        )
        assert response.json["verdict"] == "applied"

    now = int(time.time())
    send(callback(task_id="n", user_id="u", sequence=1, timestamp=now - 10))
    send(callback("transcode_stop", task_id="n", sequence=1, stop_reason=0, timestamp=now - 70))
    durations = reporting.summary(db, Window())["duration_seconds"]
    assert durations == {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    db.rollback()
    [row] = reporting.owners(db, Window())
    assert row.transcoding_seconds == 0


@pytest.mark.parametrize("until", [datetime(2025, 3, 10), datetime(2025, 3, 10, 12)])
def test_daily_reports_30_days_by_default(db: Session, until: datetime) -> None:
    days = reporting.daily(db, Window(None, until), now=until)
    assert len(days) == reporting.DEFAULT_DAYS == 30
    last = until - timedelta(microseconds=1)
    assert days[-1].day == last.date().isoformat()


@pytest.mark.parametrize("name", ["summary", "owners", "daily", "stuck"])
def test_an_owner_no_column_can_hold_is_a_400(
    client: FlaskClient, auth: dict[str, str], name: str
) -> None:
    response = client.get(f"/api/reports/{name}?owner=a%00b", headers=auth)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_parameter"
    assert "owner" in response.json["error"]["message"]


def test_the_cli_refuses_such_an_owner_too(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["report", "summary", "--owner", "a\x00b"])
    assert result.exit_code != 0
    assert "--owner must be UTF-8 text without control characters" in result.output
