"""daily and owners against a plain Python reading of their definitions, on random runs.

The runs include the awkward ones: no start, still going, ended unseen (no stop
reason), zero length, an end before the start, a start after `now`, and edges exactly
on midnight and on the window's ends. Times have microseconds, as ZEGOCLOUD's
millisecond Timestamps do not, so that any rounding in the SQL shows.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.models import TASK_STATUSES, RunDay, Task, TaskRun
from manager.reports import reporting
from manager.reports.daily import DayRow
from manager.reports.owners import OwnerRow
from manager.reports.window import Window

BASE = datetime(2025, 6, 1)
SPAN_DAYS = 6
OWNERS = ("amy", "ben", "cy", None)


@dataclass(frozen=True)
class Run:
    task: int
    owner: str | None
    started_at: datetime | None
    ended_at: datetime | None
    stop_reason: int | None


def random_time(rng: random.Random) -> datetime:
    at = BASE + timedelta(microseconds=rng.randrange(SPAN_DAYS * 86400 * 10**6))
    if rng.random() < 0.1:
        return datetime.combine(at.date(), time())  # midnight
    return at


def random_runs(rng: random.Random, tasks: int) -> tuple[list[Run], dict[int, str]]:
    runs: list[Run] = []
    statuses: dict[int, str] = {}
    for task in range(tasks):
        owner = rng.choice(OWNERS)
        start = random_time(rng)
        for _ in range(rng.choice((1, 1, 2, 3))):
            length = timedelta(seconds=rng.choice((0, 1, 600, 5000, 90000, 200000)))
            length += timedelta(microseconds=rng.randrange(10**6))
            kind = rng.random()
            started: datetime | None = start
            ended: datetime | None = start + length
            # None: it ended unseen, at the start of the task's next run.
            reason: int | None = rng.choice((0, 0, 1, None))
            if kind < 0.05:
                started = None  # its start never arrived
            elif kind < 0.08:
                ended = start - timedelta(seconds=30)  # an end before the start
            runs.append(Run(task, owner, started, ended, reason))
            gap = 0 if reason is None else rng.choice((0, 60, 40000))
            start = (ended or start) + timedelta(seconds=gap)
        last = runs[-1]
        if rng.random() < 0.4 or last.stop_reason is None:  # still going: no end
            runs[-1] = Run(task, owner, last.started_at or start, None, None)
            statuses[task] = rng.choice(("running", "stopping"))
        else:
            statuses[task] = "failed" if last.stop_reason == 1 else "stopped"
    return runs, statuses


def store(db: Session, runs: list[Run], statuses: dict[int, str]) -> None:
    pks: dict[int, int] = {}
    for task, status in statuses.items():
        row = Task(
            app_id=1, task_id=f"t{task}", owner=None, status=status, state_seq=1,
            state_rank=1, max_seq=1, runs=1, first_seen_at=BASE,
            updated_at=BASE,
        )  # fmt: skip
        db.add(row)
        db.flush()
        pks[task] = row.id
    numbers: dict[int, int] = defaultdict(int)
    for run in runs:
        numbers[run.task] += 1
        db.add(
            TaskRun(
                task_pk=pks[run.task],
                run_no=numbers[run.task],
                owner=run.owner,
                started_at=run.started_at,
                ended_at=run.ended_at,
                stop_reason=run.stop_reason,
            )  # fmt: skip
        )
    db.commit()


def inside(at: datetime | None, window: Window) -> bool:
    return (
        at is not None
        and (window.since is None or at >= window.since)
        and (window.until is None or at < window.until)
    )


def busy_us(run: Run, lo_bound: datetime | None, hi_bound: datetime | None, now: datetime) -> int:
    if run.started_at is None:
        return 0
    lo = max(t for t in (run.started_at, lo_bound) if t is not None)
    hi = min(t for t in (run.ended_at or now, hi_bound) if t is not None)
    return max((hi - lo) // timedelta(microseconds=1), 0)


def seconds(us: int) -> int:
    return (us + 500_000) // 1_000_000


def expected_daily(runs: list[Run], window: Window, now: datetime) -> list[DayRow]:
    assert window.since is not None
    assert window.until is not None
    rows = []
    day = window.since.date()
    while datetime.combine(day, time()) < window.until:
        start = max(datetime.combine(day, time()), window.since)
        end = min(datetime.combine(day + timedelta(days=1), time()), window.until)
        day_window = Window(start, end)
        rows.append(
            DayRow(
                day.isoformat(),
                sum(inside(r.started_at, day_window) for r in runs),
                sum(inside(r.ended_at, day_window) and r.stop_reason == 0 for r in runs),
                sum(inside(r.ended_at, day_window) and r.stop_reason == 1 for r in runs),
                sum(inside(r.ended_at, day_window) and r.stop_reason is None for r in runs),
                seconds(sum(busy_us(r, start, end, now) for r in runs)),
            )
        )
        day += timedelta(days=1)
    return rows


def in_window(run: Run, window: Window, now: datetime) -> bool:
    """The owners report's runs: those overlapping the window, or ended in it."""
    begin = run.started_at if run.started_at is not None else run.ended_at
    if window.until is not None and (begin is None or begin >= window.until):
        return False
    if window.since is not None:
        ongoing = run.ended_at is None and now >= window.since
        if not (ongoing or (run.ended_at is not None and run.ended_at >= window.since)):
            return False
    return True


def expected_owners(
    runs: list[Run], statuses: dict[int, str], window: Window, now: datetime
) -> list[OwnerRow]:
    groups: dict[str | None, list[Run]] = defaultdict(list)
    for run in runs:
        if in_window(run, window, now):
            groups[run.owner].append(run)
    rows = [
        OwnerRow(
            owner,
            len({r.task for r in group}),
            len({r.task for r in group if statuses[r.task] == "running"}),
            sum(r.stop_reason == 1 and inside(r.ended_at, window) for r in group),
            seconds(sum(busy_us(r, window.since, window.until, now) for r in group)),
        )
        for owner, group in groups.items()
    ]
    # Most transcoding first (by the exact microseconds), ties by owner, no owner last.
    exact = {
        owner: sum(busy_us(r, window.since, window.until, now) for r in group)
        for owner, group in groups.items()
    }
    return sorted(rows, key=lambda r: (-exact[r.owner], r.owner is None, r.owner or ""))


def expected_summary(
    runs: list[Run], statuses: dict[int, str], window: Window, now: datetime
) -> dict[str, Any]:
    """summary's task and run counts: tasks with a run in the window as owners has them."""
    tasks = {r.task for r in runs if in_window(r, window, now)}
    ended = [r for r in runs if inside(r.ended_at, window)]
    failed = sum(r.stop_reason == 1 for r in ended)
    return {
        "tasks": {
            **{status: sum(statuses[t] == status for t in tasks) for status in TASK_STATUSES},
            "total": len(tasks),
        },
        "started": sum(inside(r.started_at, window) for r in runs),
        "ended": len(ended),
        "ended_unseen": sum(r.stop_reason is None for r in ended),
        "failure_rate": round(failed / len(ended), 4) if ended else 0,
    }


def summary_counts(db: Session, window: Window, owner: str | None, now: datetime) -> Any:
    got = reporting.summary(db, window, owner, now=now)
    db.rollback()
    return {key: got[key] for key in ("tasks", "started", "ended", "ended_unseen", "failure_rate")}


def pages(db: Session, window: Window, now: datetime) -> list[OwnerRow]:
    """Every owner, one owners_page of two at a time."""
    rows: list[OwnerRow] = []
    after = None
    while True:
        page = reporting.owners_page(db, window, None, now, 2, after)
        db.rollback()
        rows += page.owners
        if page.next_key is None:
            return rows
        after = page.next_key


def random_window(rng: random.Random) -> tuple[Window, datetime]:
    a, b = sorted((random_time(rng), random_time(rng)))
    if rng.random() < 0.2:
        a = datetime.combine(a.date(), time())
    now = random_time(rng) if rng.random() < 0.3 else BASE + timedelta(days=SPAN_DAYS + 1)
    return Window(a, b if b > a else a + timedelta(hours=5)), now


def test_daily_and_owners_match_the_reference(app: Any, db: Session) -> None:
    rng = random.Random(20261125)
    runs, statuses = random_runs(rng, 60)
    store(db, runs, statuses)
    for _ in range(25):
        window, now = random_window(rng)
        got = reporting.daily(db, window, now=now)
        db.rollback()
        assert got == expected_daily(runs, window, now), (window, now)
        owner = rng.choice(OWNERS[:-1])
        mine = [r for r in runs if r.owner == owner]
        assert reporting.daily(db, window, owner, now=now) == expected_daily(mine, window, now)
        db.rollback()
        got_owners = list(reporting.owners(db, window, now=now))
        db.rollback()
        want_owners = expected_owners(runs, statuses, window, now)
        assert got_owners == want_owners, (window, now)
        # The first n, ranked by another query, and page by page through the keys.
        for n in (1, 2, 3):
            top = list(reporting.owners(db, window, now=now, limit=n))
            db.rollback()
            assert top == want_owners[:n], (window, now, n)
        assert pages(db, window, now) == want_owners, (window, now)
        # summary counts the tasks owners covers (each task has one owner here).
        want = expected_summary(runs, statuses, window, now)
        assert summary_counts(db, window, None, now) == want, (window, now)
        assert want["tasks"]["total"] == sum(row.tasks for row in want_owners)
        assert want["tasks"]["running"] == sum(row.running for row in want_owners)
        assert summary_counts(db, window, owner, now) == expected_summary(
            mine, statuses, window, now
        ), (window, now, owner)
    # Long after the runs, every day of them is final: daily takes the whole days of
    # each window from run_days and works out only the partial days at its ends.
    later = BASE + timedelta(days=SPAN_DAYS + 30)
    for _ in range(15):
        window, _now = random_window(rng)
        assert reporting.daily(db, window, now=later) == expected_daily(runs, window, later)
        db.rollback()
    assert db.scalar(select(func.count()).select_from(RunDay)) > 0, "run_days never used"
    db.rollback()
    everything = Window(BASE - timedelta(days=2, hours=5), later)
    assert reporting.daily(db, everything, now=later) == expected_daily(runs, everything, later)
    db.rollback()
    open_ended = list(reporting.owners(db, Window(), now=BASE + timedelta(days=SPAN_DAYS + 1)))
    db.rollback()
    assert open_ended == expected_owners(
        runs, statuses, Window(), BASE + timedelta(days=SPAN_DAYS + 1)
    )
