"""summary and daily agree with owners and with themselves (issue 11).

summary.tasks counts the tasks with a run that overlaps the window, the same runs the
owners report covers, by their status now; every ended run is stopped, failed or ended
unseen (ended without a stop callback: a later TranscodeStarted showed it had ended),
in summary and in each day of daily. Runs are inserted directly, except in the one
test that makes a run end unseen through the webhook.

Times are hours from D, 6 May 2025 00:00; the window is that day, and "now" is later.
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.models import TASK_STATUSES, RunDay, Task, TaskRun
from manager.reports import reporting
from manager.reports.daily import DayRow
from manager.reports.window import Window

from ..conftest import callback

D = datetime(2025, 5, 6)
WINDOW = Window(D, D + timedelta(days=1))
NOW = D + timedelta(days=3)

Run = tuple[datetime | None, datetime | None, int | None]  # started_at, ended_at, stop_reason


def h(hours: float) -> datetime:
    return D + timedelta(hours=hours)


def add_task(db: Session, task_id: str, status: str, runs: list[Run], owner: str = "ann") -> None:
    """A task and its runs; its first and last delivery at its runs' first and last times."""
    times = [t for run in runs for t in run[:2] if t is not None] or [h(1)]
    task = Task(
        app_id=1, task_id=task_id, owner=owner, status=status, state_seq=1, state_rank=1,
        max_seq=1, runs=len(runs), first_seen_at=min(times), updated_at=max(times),
        last_delivery_at=max(times),
    )  # fmt: skip
    db.add(task)
    db.flush()
    for run_no, (started, ended, reason) in enumerate(runs, start=1):
        db.add(
            TaskRun(
                task_pk=task.id,
                run_no=run_no,
                owner=owner,
                started_at=started,
                ended_at=ended,
                stop_reason=reason,
            )
        )
    db.commit()


# --- summary.tasks: the tasks with a run in the window, by status ---------------------------

# (case, status now, runs, counted in WINDOW)
TASK_CASES: list[tuple[str, str, list[Run], bool]] = [
    # Its last delivery came before the window: counted for the run, not the delivery.
    ("running through the window in silence", "running", [(h(-5), None, None)], True),
    # Its last delivery came after the window, but it ran neither in nor through it.
    ("idle in the window, restarted after it", "running",
     [(h(-10), h(-8), 0), (h(30), None, None)], False),
    ("stopped inside the window", "stopped", [(h(2), h(3), 0)], True),
    ("ended exactly at the window's start", "failed", [(h(-1), h(0), 1)], True),
    ("ended before the window", "stopped", [(h(-3), h(-1), 0)], False),
    ("started exactly at the window's end", "running", [(h(24), None, None)], False),
    ("start unknown, stopped in the window", "failed", [(None, h(5), 1)], True),
    ("start unknown, stopped after the window", "stopped", [(None, h(30), 0)], False),
    ("stopping, its run open since the window", "stopping", [(h(1), None, None)], True),
    ("ended unseen in the window, stopped after it", "stopped",
     [(h(-2), h(4), None), (h(4), h(30), 0)], True),
    ("stopping without any run", "stopping", [], False),
]  # fmt: skip


def by_status(status: str | None = None) -> dict[str, int]:
    counts = dict.fromkeys(TASK_STATUSES, 0)
    if status is not None:
        counts[status] = 1
    return {**counts, "total": int(status is not None)}


@pytest.mark.parametrize(
    ("status", "runs", "counted"),
    [pytest.param(status, runs, counted, id=case) for case, status, runs, counted in TASK_CASES],
)
def test_summary_counts_the_tasks_with_a_run_in_the_window(
    db: Session, status: str, runs: list[Run], counted: bool
) -> None:
    add_task(db, "t", status, runs)
    tasks = reporting.summary(db, WINDOW, now=NOW)["tasks"]
    db.rollback()
    assert tasks == by_status(status if counted else None)
    owners = list(reporting.owners(db, WINDOW, now=NOW))
    assert tasks["total"] == sum(row.tasks for row in owners)
    assert tasks["running"] == sum(row.running for row in owners)


def test_summary_tasks_and_owners_cover_the_same_tasks(db: Session) -> None:
    for n, (_case, status, runs, _counted) in enumerate(TASK_CASES):
        add_task(db, f"t{n}", status, runs, owner=("ann", "bob")[n % 2])
    tasks = reporting.summary(db, WINDOW, now=NOW)["tasks"]
    db.rollback()
    assert tasks == {"running": 1, "stopping": 1, "stopped": 2, "failed": 2, "total": 6}
    owners = list(reporting.owners(db, WINDOW, now=NOW))
    db.rollback()
    assert tasks["total"] == sum(row.tasks for row in owners)
    assert tasks["running"] == sum(row.running for row in owners)
    for row in owners:
        mine = reporting.summary(db, WINDOW, row.owner, now=NOW)["tasks"]
        db.rollback()
        assert (mine["total"], mine["running"]) == (row.tasks, row.running), row.owner
    # Without a window: every task with a run.
    assert reporting.summary(db, now=NOW)["tasks"]["total"] == len(TASK_CASES) - 1


# --- ended = stopped + failed + ended_unseen ------------------------------------------------

TWO_DAYS = Window(D, D + timedelta(days=2))
S = timedelta(seconds=1)

# (case, runs of one task, summary's (started, ended, ended_unseen, failure_rate) over
#  TWO_DAYS, daily's (started, stopped, failed, ended_unseen) for its two days)
ENDED_CASES: list[tuple[str, list[Run], tuple[Any, ...], list[tuple[int, ...]]]] = [
    ("stopped", [(h(1), h(2), 0)], (1, 1, 0, 0), [(1, 1, 0, 0), (0, 0, 0, 0)]),
    ("failed", [(h(1), h(2), 1)], (1, 1, 0, 1), [(1, 0, 1, 0), (0, 0, 0, 0)]),
    # TranscodeStarted Seq 1 at t, Seq 2 at t+50 s, a stop Seq 3 at t+90 s.
    ("ended unseen, then stopped", [(h(1), h(1) + 50 * S, None), (h(1) + 50 * S, h(1) + 90 * S, 0)],
     (2, 2, 1, 0), [(2, 1, 0, 1), (0, 0, 0, 0)]),
    ("ended unseen, then still going", [(h(1), h(3), None), (h(3), None, None)],
     (2, 1, 1, 0), [(2, 0, 0, 1), (0, 0, 0, 0)]),
    ("ended unseen the next day, then failed", [(h(20), h(26), None), (h(26), h(27), 1)],
     (2, 2, 1, 0.5), [(1, 0, 0, 0), (1, 0, 1, 1)]),
    ("ended unseen twice, then stopped",
     [(h(1), h(2), None), (h(2), h(30), None), (h(30), h(31), 0)],
     (3, 3, 2, 0), [(2, 0, 0, 1), (1, 1, 0, 1)]),
    ("start unknown, stopped", [(None, h(5), 0)], (0, 1, 0, 0), [(0, 1, 0, 0), (0, 0, 0, 0)]),
]  # fmt: skip


def ended_on(runs: list[Run], day: int) -> int:
    start, end = D + timedelta(days=day), D + timedelta(days=day + 1)
    return sum(1 for _, ended, _ in runs if ended is not None and start <= ended < end)


@pytest.mark.parametrize(
    ("runs", "summed", "days"),
    [pytest.param(runs, summed, days, id=case) for case, runs, summed, days in ENDED_CASES],
)
def test_ended_runs_are_stopped_failed_or_ended_unseen(
    db: Session, runs: list[Run], summed: tuple[Any, ...], days: list[tuple[int, ...]]
) -> None:
    status = "running" if runs[-1][1] is None else ("stopped", "failed")[runs[-1][2] or 0]
    add_task(db, "t", status, runs)
    summary = reporting.summary(db, TWO_DAYS, now=NOW)
    db.rollback()
    got = (summary["started"], summary["ended"], summary["ended_unseen"], summary["failure_rate"])
    assert got == summed
    rows = reporting.daily(db, TWO_DAYS, now=NOW)
    db.rollback()
    assert [(r.started, r.stopped, r.failed, r.ended_unseen) for r in rows] == days
    for n, row in enumerate(rows):
        assert row.stopped + row.failed + row.ended_unseen == ended_on(runs, n)
    assert summary["ended"] == sum(r.stopped + r.failed + r.ended_unseen for r in rows)
    assert summary["ended_unseen"] == sum(r.ended_unseen for r in rows)
    # The same, for the owner, and from run_days once the days are final.
    assert reporting.daily(db, TWO_DAYS, "ann", now=NOW) == rows
    db.rollback()
    assert reporting.daily(db, TWO_DAYS, now=NOW + timedelta(days=30)) == [
        DayRow(r.day, r.started, r.stopped, r.failed, r.ended_unseen, r.transcoding_seconds)
        for r in rows
    ]
    db.rollback()
    stored = db.scalars(select(RunDay).where(RunDay.day >= D.date()).order_by(RunDay.day)).all()
    assert [(d.stopped, d.failed, d.ended_unseen) for d in stored[:2]] == [
        (r.stopped, r.failed, r.ended_unseen) for r in rows
    ]


def test_a_run_ended_unseen_through_the_webhook(client: FlaskClient, db: Session) -> None:
    """TranscodeStarted Seq 1 at t, TranscodeStarted Seq 2 at t+50, a stop Seq 3 at t+90."""

    def send(body: dict[str, Any]) -> None:
        response = client.post(
            "/callbacks/zego", data=json.dumps(body), content_type="application/json"
        )
        assert response.json["verdict"] == "applied", response.json

    t = int(time.time()) - 200
    send(callback(task_id="u", user_id="ann", sequence=1, timestamp=t))
    send(callback(task_id="u", user_id="ann", sequence=2, timestamp=t + 50))
    send(callback("transcode_stop", task_id="u", sequence=3, stop_reason=0, timestamp=t + 90))
    at = datetime.fromtimestamp(t, UTC).replace(tzinfo=None)
    runs = db.scalars(select(TaskRun).order_by(TaskRun.run_no)).all()
    assert [(r.started_at, r.ended_at, r.stop_reason) for r in runs] == [
        (at, at + 50 * S, None),  # ended unseen, when Seq 2 started
        (at + 50 * S, at + 90 * S, 0),
    ]
    db.rollback()
    window = Window(at - timedelta(days=1), at + timedelta(days=1))
    summary = reporting.summary(db, window)
    db.rollback()
    assert summary["tasks"] == by_status("stopped")
    assert (summary["started"], summary["ended"], summary["ended_unseen"]) == (2, 2, 1)
    assert summary["failure_rate"] == 0
    assert summary["duration_seconds"] == {"mean": 45.0, "p50": 40.0, "p95": 50.0}
    days = reporting.daily(db, window)
    assert sum(d.started for d in days) == 2
    assert sum(d.stopped for d in days) == sum(d.ended_unseen for d in days) == 1
    assert sum(d.failed for d in days) == 0


# --- the edges: HTTP and CLI ----------------------------------------------------------------

SINCE, UNTIL = "2025-05-06T00:00:00Z", "2025-05-08T00:00:00Z"


@pytest.fixture
def unseen(db: Session) -> Session:
    """One task whose first run ended unseen, then stopped; one failed."""
    add_task(db, "u", "stopped", ENDED_CASES[2][1])
    add_task(db, "f", "failed", [(h(30), h(31), 1)], owner="bob")
    return db


SUMMARY = {
    "tasks": {"running": 0, "stopping": 0, "stopped": 1, "failed": 1, "total": 2},
    "started": 3,
    "ended": 3,
    "ended_unseen": 1,
    "failure_rate": 0.3333,
    "duration_seconds": {"mean": 1230.0, "p50": 50.0, "p95": 3600.0},
    "stop_requests": {"queued": 0, "succeeded": 0, "failed": 0},
    "deliveries": {"applied": 0, "duplicate": 0, "stale": 0, "rejected": 0},
}
DAYS = [
    {"day": "2025-05-06", "started": 2, "stopped": 1, "failed": 0, "ended_unseen": 1,
     "transcoding_seconds": 90},
    {"day": "2025-05-07", "started": 1, "stopped": 0, "failed": 1, "ended_unseen": 0,
     "transcoding_seconds": 3600},
]  # fmt: skip


def test_http_summary_and_daily_carry_ended_unseen(
    client: FlaskClient, auth: dict[str, str], unseen: Session
) -> None:
    path = f"/api/reports/summary?since={SINCE}&until={UNTIL}"
    assert client.get(path, headers=auth).json == SUMMARY
    text = client.get(path + "&format=csv", headers=auth).get_data(as_text=True)
    header, row = csv.reader(io.StringIO(text))
    assert header[5:9] == ["started", "ended", "ended_unseen", "failure_rate"]
    assert dict(zip(header, row, strict=True))["ended_unseen"] == "1"
    path = f"/api/reports/daily?since={SINCE}&until={UNTIL}"
    assert client.get(path, headers=auth).json == {"days": DAYS}
    text = client.get(path + "&format=csv", headers=auth).get_data(as_text=True)
    assert list(csv.DictReader(io.StringIO(text))) == [
        {k: str(v) for k, v in day.items()} for day in DAYS
    ]


def test_cli_summary_and_daily_carry_ended_unseen(runner: FlaskCliRunner, unseen: Session) -> None:
    window = ["--since", SINCE, "--until", UNTIL]

    def report(*args: str) -> str:
        result = runner.invoke(args=["report", *args, *window])
        assert result.exit_code == 0, result.output
        return result.output

    assert json.loads(report("summary", "--format", "json")) == SUMMARY
    assert ["ended_unseen", "1"] in [line.split() for line in report("summary").splitlines()]
    (row,) = csv.DictReader(io.StringIO(report("summary", "--format", "csv")))
    assert (row["ended"], row["ended_unseen"], row["tasks.total"]) == ("3", "1", "2")
    assert json.loads(report("daily", "--format", "json")) == {"days": DAYS}
    table = report("daily").splitlines()
    assert table[0].split() == [
        "day", "started", "stopped", "failed", "ended_unseen", "transcoding_seconds"
    ]  # fmt: skip
    assert table[2].split() == ["2025-05-06", "2", "1", "0", "1", "90"]
    assert list(csv.DictReader(io.StringIO(report("daily", "--format", "csv")))) == [
        {k: str(v) for k, v in day.items()} for day in DAYS
    ]
