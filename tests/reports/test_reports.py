"""Reports: a known history, every number of every report, on SQLite and PostgreSQL.

The window is [Mar 10, Mar 13) 2025 and "now" is Mar 14 00:00, after it. Times below
are hours from Mar 10 00:00 (D). The expected figures are worked out by hand in the
comments next to each run.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy.orm import Session

from manager.models import Delivery, StopRequest, Task, TaskRun
from manager.reports import reporting
from manager.reports.daily import DayRow
from manager.reports.owners import OwnerKey, OwnerRow
from manager.reports.params import decode_owners_cursor, encode_owners_cursor
from manager.reports.stuck import StuckTask
from manager.reports.window import Window

D = datetime(2025, 3, 10)
NOW = D + timedelta(days=4)
WINDOW = Window(D, D + timedelta(days=3))
SINCE, UNTIL = "2025-03-10T00:00:00Z", "2025-03-13T00:00:00Z"


def h(hours: float) -> datetime:
    return D + timedelta(hours=hours)


# task_id: owner, status, first_seen, last_delivery, updated_at, runs (start, end, reason)
HISTORY: dict[str, tuple[Any, ...]] = {
    # 1 h in the window (crosses its start), then 8 h across the Mar 10/11 boundary.
    "A1": ("alice", "stopped", h(-2), h(28), h(28), [(h(-2), h(1), 0), (h(20), h(28), 0)]),
    "A2": ("alice", "failed", h(30), h(30.5), h(30.5), [(h(30), h(30.5), 1)]),
    # Running: 22 h in the window (clipped at its end), 46 h up to now.
    "A3": ("alice", "running", h(50), h(50), h(50), [(h(50), None, None)]),
    # A run before the window, then a running one: 26 h in the window.
    "B1": ("bob", "running", h(-48), h(46), h(46), [(h(-48), h(-47), 0), (h(46), None, None)]),
    # Stopping since h(60): its run is still open, 62 h in the window.
    "B2": ("bob", "stopping", h(10), h(10), h(60), [(h(10), None, None)]),
    # The start never arrived: a failed run with no time.
    "B3": ("bob", "failed", h(5), h(5), h(5), [(None, h(5), 1)]),
    # Crosses the window's end: 1 h inside.
    "B4": ("bob", "stopped", h(71), h(73), h(73), [(h(71), h(73), 0)]),
    "C1": ("carol", "stopped", h(-30), h(-29), h(-29), [(h(-30), h(-29), 0)]),
    # Ends exactly at the window's start: counts as ended (and failed) in it, 0 s inside.
    "C2": ("carol", "failed", h(-1), h(0), h(0), [(h(-1), h(0), 1)]),
    # First seen after the window.
    "D1": ("dave", "running", h(80), h(80), h(80), [(h(80), None, None)]),
    "N1": (None, "stopped", h(12), h(13), h(13), [(h(12), h(13), 0)]),
    # Stopping without any delivery recorded; and one stopping for only 60 s at NOW.
    "E1": ("erin", "stopping", h(1), None, h(1), []),
    "F1": ("erin", "stopping", NOW - timedelta(seconds=60), None, NOW - timedelta(seconds=60), []),
}

# (task_id, state, created_at): three in the window, one before it.
STOPS = [("B2", "succeeded", h(60)), ("E1", "queued", h(1)), ("A2", "failed", h(30)),
         ("C1", "succeeded", h(-29))]  # fmt: skip

# (task_id or None, verdict, received_at)
DELIVERIES = [
    ("A1", "applied", h(1)), ("A2", "applied", h(30)), ("B1", "applied", h(46)),
    ("A1", "duplicate", h(2)), ("B2", "duplicate", h(10)),
    ("B1", "stale", h(47)),
    (None, "rejected", h(5)),
    ("C1", "applied", h(-29)), (None, "rejected", h(80)),
]  # fmt: skip


@pytest.fixture
def history(app: Any, db: Session) -> Session:
    """The known history, inserted directly: the webhook only takes fresh callbacks."""
    tasks: dict[str, Task] = {}
    for task_id, (owner, status, first_seen, last, updated, runs) in HISTORY.items():
        task = Task(
            app_id=1, task_id=task_id, owner=owner, status=status, state_seq=1, state_rank=1,
            max_seq=1, runs=len(runs), first_seen_at=first_seen,
            updated_at=updated, last_delivery_at=last,
        )  # fmt: skip
        db.add(task)
        db.flush()
        tasks[task_id] = task
        for run_no, (start, end, reason) in enumerate(runs, start=1):
            db.add(
                TaskRun(
                    task_pk=task.id,
                    run_no=run_no,
                    owner=owner,
                    started_at=start,
                    ended_at=end,
                    stop_reason=reason,
                )  # fmt: skip
            )
    for task_id, state, created in STOPS:
        task = tasks[task_id]
        db.add(
            StopRequest(
                task_pk=task.id,
                state=state,
                user_id=task.owner,
                requested_by="ops",
                created_at=created,
                next_attempt_at=created,
                attempts=1,
                force=False,
            )  # fmt: skip
        )
    for task_id, verdict, received in DELIVERIES:
        db.add(
            Delivery(
                received_at=received,
                verdict=verdict,
                body_size=2,
                raw_body=b"{}",
                task_pk=tasks[task_id].id if task_id else None,
            )  # fmt: skip
        )
    db.commit()
    return db


# --- summary ------------------------------------------------------------------------------

SUMMARY_IN_WINDOW = {
    # With a run in the window, as owners counts them: all but C1 (its run is before the
    # window), D1 (its run after it), E1 and F1 (no run).
    "tasks": {"running": 2, "stopping": 1, "stopped": 3, "failed": 3, "total": 9},
    # Started: A1#2, A2, A3, B1#2, B2, B4, N1. Ended: A1#1, A1#2, A2, B3, C2, N1.
    "started": 7,
    "ended": 6,
    "ended_unseen": 0,
    "failure_rate": 0.5,  # A2, B3, C2
    # Durations of ended runs with a start: 1800, 3600, 3600, 10800, 28800.
    "duration_seconds": {"mean": 9720.0, "p50": 3600.0, "p95": 28800.0},
    "stop_requests": {"queued": 1, "succeeded": 1, "failed": 1},
    "deliveries": {"applied": 3, "duplicate": 2, "stale": 1, "rejected": 1},
}


def test_summary_in_window(history: Session) -> None:
    assert reporting.summary(history, WINDOW) == SUMMARY_IN_WINDOW


def test_summary_for_one_owner(history: Session) -> None:
    assert reporting.summary(history, WINDOW, "alice") == {
        "tasks": {"running": 1, "stopping": 0, "stopped": 1, "failed": 1, "total": 3},
        "started": 3,
        "ended": 3,
        "ended_unseen": 0,
        "failure_rate": 0.3333,
        # 1800, 10800, 28800: nearest rank 2 of 3 and 3 of 3.
        "duration_seconds": {"mean": 13800.0, "p50": 10800.0, "p95": 28800.0},
        "stop_requests": {"queued": 0, "succeeded": 0, "failed": 1},
        "deliveries": {"applied": 2, "duplicate": 1, "stale": 0, "rejected": 0},
    }


def test_summary_without_window(history: Session) -> None:
    assert reporting.summary(history) == {
        # Every task with a run: all but E1 and F1.
        "tasks": {"running": 3, "stopping": 1, "stopped": 4, "failed": 3, "total": 11},
        "started": 12,
        "ended": 9,
        "ended_unseen": 0,
        "failure_rate": 0.3333,
        # 1800, 3600 x4, 10800, 7200, 28800
        "duration_seconds": {"mean": 7875.0, "p50": 3600.0, "p95": 28800.0},
        "stop_requests": {"queued": 1, "succeeded": 2, "failed": 1},
        "deliveries": {"applied": 4, "duplicate": 2, "stale": 1, "rejected": 2},
    }


def test_summary_of_an_empty_window(history: Session) -> None:
    empty = reporting.summary(history, Window(datetime(2020, 1, 1), datetime(2020, 1, 2)))
    assert empty["tasks"]["total"] == 0
    assert empty["failure_rate"] == 0
    assert empty["duration_seconds"] == {"mean": None, "p50": None, "p95": None}
    assert empty["deliveries"] == {"applied": 0, "duplicate": 0, "stale": 0, "rejected": 0}


# --- owners -------------------------------------------------------------------------------

OWNERS_IN_WINDOW = [
    # B1#2 93600 + B2 223200 + B3 0 + B4 3600; B1 running (B2 is stopping); B3 failed.
    OwnerRow("bob", 4, 1, 1, 320400),
    # A1 3600 + 28800, A2 1800, A3 79200.
    OwnerRow("alice", 3, 1, 1, 113400),
    OwnerRow(None, 1, 0, 0, 3600),
    OwnerRow("carol", 1, 0, 1, 0),  # C2, ended at the window's start
]


def test_owners_in_window(history: Session) -> None:
    assert list(reporting.owners(history, WINDOW, now=NOW)) == OWNERS_IN_WINDOW


def test_owners_without_window_count_running_runs_up_to_now(history: Session) -> None:
    assert list(reporting.owners(history, now=NOW)) == [
        OwnerRow("bob", 4, 1, 1, 3600 + 180000 + 309600 + 7200),
        OwnerRow("alice", 3, 1, 1, 10800 + 28800 + 1800 + 165600),
        OwnerRow("dave", 1, 1, 0, 57600),
        OwnerRow("carol", 2, 0, 1, 7200),
        OwnerRow(None, 1, 0, 0, 3600),
    ]


def test_owners_filter_and_a_window_inside_a_run(history: Session) -> None:
    assert list(reporting.owners(history, WINDOW, "alice", now=NOW)) == [OWNERS_IN_WINDOW[1]]
    # Mar 11 12:00-13:00: only B1#2 (from 22:00) is not yet going; B2 is.
    inside = Window(h(36), h(37))
    assert list(reporting.owners(history, inside, now=NOW)) == [OwnerRow("bob", 1, 0, 0, 3600)]


def test_owners_running_counts_tasks_running_now_and_runs_without_an_owner(
    history: Session,
) -> None:
    def add(task_id: str, owner: str | None, runs: list[tuple[Any, ...]]) -> None:
        task = Task(
            app_id=1, task_id=task_id, owner=owner, status="running", state_seq=1,
            state_rank=1, max_seq=1, runs=len(runs), first_seen_at=runs[0][0],
            updated_at=runs[-1][0], last_delivery_at=runs[-1][0],
        )  # fmt: skip
        history.add(task)
        history.flush()
        for run_no, (start, end) in enumerate(runs, start=1):
            history.add(
                TaskRun(task_pk=task.id, run_no=run_no, owner=owner, started_at=start, ended_at=end,
                        stop_reason=None if end is None else 0)
            )  # fmt: skip

    # Running now; its only run in the window ended in it, the current one began after.
    add("G1", "gina", [(h(1), h(2)), (h(75), None)])
    # Running, with no owner: with N1 (stopped), the unowned runs hold one running task.
    add("U1", None, [(h(20), None)])
    history.commit()
    rows = {row.owner: row for row in reporting.owners(history, WINDOW, now=NOW)}
    assert rows["gina"] == OwnerRow("gina", 1, 1, 0, 3600)
    assert rows[None] == OwnerRow(None, 2, 1, 0, 3600 + 52 * 3600)
    assert rows["bob"] == OWNERS_IN_WINDOW[0]


def test_owners_ties_go_by_owner(history: Session) -> None:
    # Mar 13 08:00-09:00 holds an hour of A3, B1, B2 and D1 each.
    rows = list(reporting.owners(history, Window(h(80), h(81)), now=NOW))
    assert rows == [
        OwnerRow("bob", 2, 1, 0, 7200),
        OwnerRow("alice", 1, 1, 0, 3600),
        OwnerRow("dave", 1, 1, 0, 3600),
    ]


def add_owners(db: Session, runs: dict[str | None, list[tuple[datetime, datetime | None]]]) -> None:
    """One task per run, stopped (or running when the run has no end), for each owner."""
    for owner, spans in runs.items():
        for start, end in spans:
            task = Task(
                app_id=1, task_id=f"x{db.info.setdefault('n', 0)}", owner=owner,
                status="stopped" if end else "running", state_seq=1, state_rank=1, max_seq=1,
                runs=1, first_seen_at=start, updated_at=start,
            )  # fmt: skip
            db.info["n"] += 1
            db.add(task)
            db.flush()
            db.add(
                TaskRun(task_pk=task.id, run_no=1, owner=owner, started_at=start, ended_at=end,
                        stop_reason=None if end is None else 0)
            )  # fmt: skip
    db.commit()


# Mar 13 08:00-09:00 (see test_owners_ties_go_by_owner) with ties on both sides of a page
# boundary: 2 h for bob and tia, 1 h for alice, dave, uma and the runs without an owner,
# none for vic, whose run ended just before.
TIED = Window(h(80), h(81))


@pytest.fixture
def tied(history: Session) -> Session:
    add_owners(
        history,
        {
            "tia": [(h(79), h(82)), (h(80), h(81))],
            "uma": [(h(80), h(81))],
            None: [(h(79.5), h(81))],
            "vic": [(h(79), h(80))],
        },
    )
    return history


@pytest.mark.parametrize("window", [WINDOW, Window(), TIED, Window(h(36), h(37))])
def test_owners_limit_is_the_first_n_of_the_whole_list(tied: Session, window: Window) -> None:
    full = list(reporting.owners(tied, window, now=NOW))
    assert full
    for n in range(1, len(full) + 2):
        assert list(reporting.owners(tied, window, now=NOW, limit=n)) == full[:n], n
        page = reporting.owners_page(tied, window, None, NOW, n)
        assert page.owners == full[:n]
        assert page.more == (n < len(full))
        assert (page.next_key is None) == (n >= len(full))


def test_owners_limit_keeps_ties_in_owner_order(tied: Session) -> None:
    names = [row.owner for row in reporting.owners(tied, TIED, now=NOW)]
    assert names == ["bob", "tia", "alice", "dave", "uma", None, "vic"]
    assert [row.owner for row in reporting.owners(tied, TIED, now=NOW, limit=4)] == names[:4]
    assert list(reporting.owners(tied, TIED, "uma", now=NOW, limit=1)) == [
        OwnerRow("uma", 1, 0, 0, 3600)
    ]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_owners_pages_follow_one_another_through_ties(tied: Session, size: int) -> None:
    full = list(reporting.owners(tied, TIED, now=NOW))
    pages: list[OwnerRow] = []
    after: OwnerKey | None = None
    while True:
        page = reporting.owners_page(tied, TIED, None, NOW, size, after)
        pages += page.owners
        if page.next_key is None:
            break
        # The rest, from the whole-list query, starts where the page ends.
        rest = list(reporting.owners(tied, TIED, now=NOW, after=page.next_key))
        assert rest == full[len(pages) :]
        after = page.next_key
    assert pages == full


def test_owners_page_keys_carry_the_exact_time(tied: Session) -> None:
    page = reporting.owners_page(tied, TIED, None, NOW, 6)
    assert page.next_key == OwnerKey(3600 * 10**6, None)
    assert [row.owner for row in reporting.owners(tied, TIED, now=NOW, after=page.next_key)] == [
        "vic"
    ]
    key = OwnerKey(3600 * 10**6, "alice")
    assert [row.owner for row in reporting.owners(tied, TIED, now=NOW, limit=2, after=key)] == [
        "dave",
        "uma",
    ]


# --- daily --------------------------------------------------------------------------------

DAILY_IN_WINDOW = [
    # started A1#2 B2 N1; stopped A1#1 N1; failed B3 C2; A1#1 3600 A1#2 14400 B2 50400 N1 3600
    DayRow("2025-03-10", 3, 2, 2, 0, 72000),
    # started A2 B1#2; stopped A1#2; failed A2; A1#2 14400 A2 1800 B1#2 7200 B2 86400
    DayRow("2025-03-11", 2, 1, 1, 0, 109800),
    # started A3 B4; A3 79200 B1#2 86400 B2 86400 B4 3600
    DayRow("2025-03-12", 2, 0, 0, 0, 255600),
]


def test_daily_in_window(history: Session) -> None:
    assert reporting.daily(history, WINDOW, now=NOW) == DAILY_IN_WINDOW
    total = sum(d.transcoding_seconds for d in DAILY_IN_WINDOW)
    assert total == sum(o.transcoding_seconds for o in OWNERS_IN_WINDOW)


def test_daily_clips_partial_days_to_the_window(history: Session) -> None:
    assert reporting.daily(history, Window(h(12), h(36)), now=NOW) == [
        DayRow("2025-03-10", 2, 1, 0, 0, 14400 + 43200 + 3600),
        DayRow("2025-03-11", 1, 1, 1, 0, 14400 + 1800 + 43200),
    ]


def test_daily_for_one_owner(history: Session) -> None:
    assert reporting.daily(history, WINDOW, "bob", now=NOW) == [
        DayRow("2025-03-10", 1, 0, 1, 0, 50400),
        DayRow("2025-03-11", 1, 0, 0, 0, 7200 + 86400),
        DayRow("2025-03-12", 1, 0, 0, 0, 86400 + 86400 + 3600),
    ]


def test_daily_defaults_to_the_last_30_days(history: Session) -> None:
    days = reporting.daily(history, now=NOW + timedelta(hours=6))
    assert len(days) == 30
    assert (days[0].day, days[-1].day) == ("2025-02-13", "2025-03-14")
    by_day = {d.day: d for d in days}
    assert by_day["2025-03-08"] == DayRow("2025-03-08", 2, 2, 0, 0, 7200)  # B1#1, C1
    assert by_day["2025-03-09"] == DayRow("2025-03-09", 2, 0, 0, 0, 7200 + 3600)  # A1#1, C2
    assert by_day["2025-03-10"] == DAILY_IN_WINDOW[0]
    # A3, B1#2, B2 all day; B4 to 01:00 (stopped); D1 from 08:00.
    assert by_day["2025-03-13"] == DayRow("2025-03-13", 1, 1, 0, 0, 3 * 86400 + 3600 + 57600)
    assert by_day["2025-03-14"] == DayRow("2025-03-14", 0, 0, 0, 0, 4 * 6 * 3600)
    assert sum(d.started for d in days) == 12


# --- stuck --------------------------------------------------------------------------------

STUCK = [
    StuckTask("E1", "erin", "stopping", h(1), "no_stop_callback"),
    StuckTask("B1", "bob", "running", h(46), "no_delivery"),
    StuckTask("A3", "alice", "running", h(50), "no_delivery"),
    StuckTask("B2", "bob", "stopping", h(60), "no_stop_callback"),
]


def test_stuck(history: Session) -> None:
    # F1 has been stopping for only 60 s; D1 heard from 16 h ago.
    assert list(reporting.stuck(history, now=NOW)) == STUCK
    assert list(reporting.stuck(history, now=NOW, owner="bob")) == [STUCK[1], STUCK[3]]


def test_stuck_silent_for(history: Session) -> None:
    def ids(silent_for: int) -> list[str]:
        rows = reporting.stuck(history, now=NOW, silent_for=silent_for)
        return [t.task_id for t in rows]

    assert ids(100_000) == ["E1", "B1", "A3", "B2"]  # since Mar 12 20:13:20
    assert ids(200_000) == ["E1", "B2"]  # since Mar 11 16:26:40: B1 and A3 spoke later
    assert ids(0) == ["E1", "B1", "A3", "B2", "D1"]


# --- HTTP ---------------------------------------------------------------------------------


def get(client: FlaskClient, auth: dict[str, str], path: str, **headers: str) -> Any:
    response = client.get(path, headers={**auth, **headers})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def csv_rows(response: Any) -> list[dict[str, str]]:
    assert response.mimetype == "text/csv"
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def as_csv_text(value: Any) -> str:
    return "" if value is None else str(value)


def test_http_summary_json_and_csv_agree(
    client: FlaskClient, auth: dict[str, str], history: Session
) -> None:
    path = f"/api/reports/summary?since={SINCE}&until={UNTIL}"
    assert get(client, auth, path).json == SUMMARY_IN_WINDOW
    (row,) = csv_rows(get(client, auth, path + "&format=csv"))
    assert row == {
        "tasks.running": "2", "tasks.stopping": "1", "tasks.stopped": "3", "tasks.failed": "3",
        "tasks.total": "9", "started": "7", "ended": "6", "ended_unseen": "0",
        "failure_rate": "0.5",
        "duration_seconds.mean": "9720.0", "duration_seconds.p50": "3600.0",
        "duration_seconds.p95": "28800.0", "stop_requests.queued": "1",
        "stop_requests.succeeded": "1", "stop_requests.failed": "1", "deliveries.applied": "3",
        "deliveries.duplicate": "2", "deliveries.stale": "1", "deliveries.rejected": "1",
    }  # fmt: skip
    by_accept = get(client, auth, path, Accept="text/csv")
    assert csv_rows(by_accept) == [row]


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("owners", "owners", OWNERS_IN_WINDOW),
        ("daily", "days", DAILY_IN_WINDOW),
    ],
)
def test_http_lists_json_and_csv_agree(
    client: FlaskClient,
    auth: dict[str, str],
    history: Session,
    name: str,
    key: str,
    expected: list[Any],
) -> None:
    # The window ends before the real "now", so running runs are clipped the same way.
    path = f"/api/reports/{name}?since={SINCE}&until={UNTIL}"
    items = get(client, auth, path).json[key]
    assert items == [dataclasses.asdict(r) for r in expected]
    rows = csv_rows(get(client, auth, path + "&format=csv"))
    assert rows == [{k: as_csv_text(v) for k, v in item.items()} for item in items]
    assert list(rows[0]) == list(reporting.COLUMNS[name])


def test_http_owner_filter(client: FlaskClient, auth: dict[str, str], history: Session) -> None:
    path = f"/api/reports/owners?since={SINCE}&until={UNTIL}&owner=alice"
    assert get(client, auth, path).json == {
        "owners": [
            {"owner": "alice", "tasks": 3, "running": 1, "failed": 1, "transcoding_seconds": 113400}
        ],
        "more": False,
        "next_cursor": None,
    }
    summary = get(client, auth, f"/api/reports/summary?since={SINCE}&until={UNTIL}&owner=bob")
    assert summary.json["tasks"]["total"] == 4


def test_http_stuck_json_and_csv_agree(
    client: FlaskClient, auth: dict[str, str], history: Session
) -> None:
    # Real time is long after the history: D1 and F1 are stuck too.
    items = get(client, auth, "/api/reports/stuck").json["tasks"]
    assert [t["task_id"] for t in items] == ["E1", "B1", "A3", "B2", "D1", "F1"]
    assert items[0] == {
        "task_id": "E1", "owner": "erin", "status": "stopping",
        "since": "2025-03-10T01:00:00Z", "reason": "no_stop_callback",
    }  # fmt: skip
    rows = csv_rows(get(client, auth, "/api/reports/stuck?format=csv&owner=bob"))
    assert rows == [{k: as_csv_text(v) for k, v in t.items()} for t in items if t["owner"] == "bob"]


def test_http_empty_lists(client: FlaskClient, auth: dict[str, str]) -> None:
    assert get(client, auth, "/api/reports/owners").json == {
        "owners": [],
        "more": False,
        "next_cursor": None,
    }
    assert get(client, auth, "/api/reports/stuck").json == {"tasks": []}
    assert get(client, auth, "/api/reports/stuck?format=csv").get_data(as_text=True) == (
        "task_id,owner,status,since,reason\n"
    )
    days = get(client, auth, "/api/reports/daily").json["days"]
    assert len(days) == 30
    assert all(d["started"] == d["transcoding_seconds"] == 0 for d in days)


@pytest.fixture
def many_owners(history: Session) -> Session:
    """105 more owners, o000 to o104, o104 with the most time: 109 in WINDOW."""
    add_owners(history, {f"o{i:03}": [(h(1), h(1) + timedelta(minutes=i))] for i in range(105)})
    return history


def test_http_owners_json_is_the_first_100_with_a_cursor_to_the_rest(
    client: FlaskClient, auth: dict[str, str], many_owners: Session
) -> None:
    path = f"/api/reports/owners?since={SINCE}&until={UNTIL}"
    everyone = csv_rows(get(client, auth, path + "&format=csv"))
    assert len(everyone) == 109
    first = get(client, auth, path).json
    assert len(first["owners"]) == 100
    assert first["more"] is True
    assert [as_csv_text(o["owner"]) for o in first["owners"]] == [
        row["owner"] for row in everyone[:100]
    ]
    rest = get(client, auth, path + f"&cursor={first['next_cursor']}").json
    assert rest["more"] is False
    assert rest["next_cursor"] is None
    assert [as_csv_text(o["owner"]) for o in rest["owners"]] == [
        row["owner"] for row in everyone[100:]
    ]
    # A cursor with CSV: every owner after it.
    after = csv_rows(get(client, auth, path + f"&format=csv&cursor={first['next_cursor']}"))
    assert after == everyone[100:]


def test_http_owners_limit(client: FlaskClient, auth: dict[str, str], many_owners: Session) -> None:
    path = f"/api/reports/owners?since={SINCE}&until={UNTIL}"
    everyone = csv_rows(get(client, auth, path, Accept="text/csv"))
    assert len(everyone) == 109
    top = get(client, auth, path + "&limit=3").json
    assert [o["owner"] for o in top["owners"]] == ["bob", "alice", "o104"]
    assert top["more"] is True
    assert top["owners"][2] == {
        "owner": "o104", "tasks": 1, "running": 0, "failed": 0, "transcoding_seconds": 104 * 60
    }  # fmt: skip
    page2 = get(client, auth, path + f"&limit=3&cursor={top['next_cursor']}").json
    assert [o["owner"] for o in page2["owners"]] == ["o103", "o102", "o101"]
    whole = get(client, auth, path + "&limit=10000").json
    assert whole["more"] is False
    assert [as_csv_text(o["owner"]) for o in whole["owners"]] == [r["owner"] for r in everyone]
    exactly = get(client, auth, path + "&limit=109").json
    assert (len(exactly["owners"]), exactly["more"]) == (109, False)
    limited = csv_rows(get(client, auth, path + "&format=csv&limit=3"))
    assert limited == everyone[:3]
    limited = csv_rows(get(client, auth, path + "&limit=5", Accept="text/csv"))
    assert limited == everyone[:5]


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=10001",
        "limit=-1",
        "limit=abc",
        "limit=2.5",
        "limit=%201",
        "format=csv&limit=0",
    ],
)
def test_http_owners_bad_limit_is_400(
    client: FlaskClient, auth: dict[str, str], query: str
) -> None:
    response = client.get(f"/api/reports/owners?{query}", headers=auth)
    assert response.status_code == 400
    assert response.json["error"] == {
        "code": "invalid_parameter",
        "message": "limit must be an integer from 1 to 10000",
    }


@pytest.mark.parametrize(
    "raw",
    [
        "nope",
        "[1, 2]",
        '["1", null, "2025-01-01"]',
        '[-1, null, "2025-01-01"]',
        '[1, 2, "2025-01-01"]',
        '[1, null, "soon"]',
        '[1, null, "2025-01-01T00:00:00+02:00"]',
    ],
)
def test_http_owners_bad_cursor_is_400(client: FlaskClient, auth: dict[str, str], raw: str) -> None:
    cursor = base64.urlsafe_b64encode(raw.encode()).decode()
    response = client.get(f"/api/reports/owners?cursor={cursor}", headers=auth)
    assert response.status_code == 400
    assert response.json["error"]["message"].startswith("cursor")


def test_owners_cursor_carries_the_key_and_the_time() -> None:
    at = datetime(2025, 3, 14, 1, 2, 3, 456789)
    for key in (OwnerKey(0, None), OwnerKey(123456789, 'ünï cödé, "quoted"')):
        assert decode_owners_cursor(encode_owners_cursor(key, at)) == (key, at)


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("summary?since=yesterday", "since"),
        ("owners?until=2025-13-01", "until"),
        ("daily?since=2025-03-02&until=2025-03-01", "until"),
        ("daily?since=2000-01-01&until=2025-01-01", "since/until"),
        ("stuck?silent_for=-5", "silent_for"),
        ("stuck?silent_for=abc", "silent_for"),
        ("summary?format=xml", "format"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    client: FlaskClient, auth: dict[str, str], query: str, parameter: str
) -> None:
    response = client.get(f"/api/reports/{query}", headers=auth)
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "invalid_parameter"
    assert error["message"].startswith(parameter)


def test_unknown_report_is_404(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.get("/api/reports/nope", headers=auth)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "unknown_report"


def test_reports_need_a_token(client: FlaskClient) -> None:
    for name in reporting.REPORTS:
        response = client.get(f"/api/reports/{name}?format=csv")
        assert response.status_code == 401
        assert response.json["error"]["code"] == "unauthorized"


# --- CLI ----------------------------------------------------------------------------------


def test_cli_tables(runner: FlaskCliRunner, history: Session) -> None:
    result = runner.invoke(args=["report", "owners", "--since", SINCE, "--until", UNTIL])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["owner", "tasks", "running", "failed", "transcoding_seconds"]
    assert lines[2].split() == ["bob", "4", "1", "1", "320400"]
    # Aligned: every column starts where its header does.
    assert lines[2].index("320400") == lines[0].index("transcoding_seconds")

    summary = runner.invoke(args=["report", "summary", "--since", SINCE, "--until", UNTIL])
    assert summary.exit_code == 0, summary.output
    assert ["tasks.total", "9"] in [line.split() for line in summary.output.splitlines()]

    daily = runner.invoke(args=["report", "daily", "--since", SINCE, "--until", UNTIL])
    assert daily.output.splitlines()[0].split() == [
        "day", "started", "stopped", "failed", "ended_unseen", "transcoding_seconds"
    ]  # fmt: skip
    assert daily.output.splitlines()[2].split() == ["2025-03-10", "3", "2", "2", "0", "72000"]

    stuck = runner.invoke(args=["report", "stuck", "--owner", "erin"])
    assert [line.split()[0] for line in stuck.output.splitlines()[2:]] == ["E1", "F1"]


def test_cli_owners_limit(runner: FlaskCliRunner, many_owners: Session) -> None:
    window = ["--since", SINCE, "--until", UNTIL]
    table = runner.invoke(args=["report", "owners", *window])
    assert table.exit_code == 0, table.output
    assert len(table.stdout.splitlines()) == 2 + 100
    assert "the first 100 owners" in table.stderr
    top = runner.invoke(args=["report", "owners", "--limit", "2", *window])
    assert [line.split()[0] for line in top.stdout.splitlines()[2:]] == ["bob", "alice"]
    as_json = json.loads(
        runner.invoke(args=["report", "owners", "--format", "json", "--limit", "3", *window]).stdout
    )
    assert [o["owner"] for o in as_json["owners"]] == ["bob", "alice", "o104"]
    assert as_json["more"] is True
    everyone = runner.invoke(args=["report", "owners", "--format", "csv", *window])
    assert len(everyone.stdout.splitlines()) == 1 + 109
    first = runner.invoke(args=["report", "owners", "--format", "csv", "--limit", "3", *window])
    assert first.stdout.splitlines() == everyone.stdout.splitlines()[:4]
    whole = runner.invoke(args=["report", "owners", "--limit", "10000", *window])
    assert len(whole.stdout.splitlines()) == 2 + 109
    assert whole.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["owners", "--limit", "0"], "limit must be an integer from 1 to 10000"),
        (["owners", "--limit", "many"], "limit must be an integer from 1 to 10000"),
        (["stuck", "--limit", "5"], "--limit applies to the owners report only"),
    ],
)
def test_cli_bad_limit(runner: FlaskCliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(args=["report", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_cli_csv_and_json_agree(runner: FlaskCliRunner, history: Session) -> None:
    window = ["--since", SINCE, "--until", UNTIL]
    as_json = runner.invoke(args=["report", "daily", "--format", "json", *window])
    as_csv = runner.invoke(args=["report", "daily", "--format", "csv", *window])
    days = json.loads(as_json.output)["days"]
    assert days[0] == {
        "day": "2025-03-10", "started": 3, "stopped": 2, "failed": 2, "ended_unseen": 0,
        "transcoding_seconds": 72000,
    }  # fmt: skip
    assert list(csv.DictReader(io.StringIO(as_csv.output))) == [
        {k: str(v) for k, v in d.items()} for d in days
    ]
    summary = runner.invoke(args=["report", "summary", "--format", "json", *window])
    assert json.loads(summary.output) == SUMMARY_IN_WINDOW


def test_cli_bad_parameters(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["report", "summary", "--since", "soon"])
    assert result.exit_code != 0
    assert "since must be" in result.output
    assert runner.invoke(args=["report", "weekly"]).exit_code != 0
