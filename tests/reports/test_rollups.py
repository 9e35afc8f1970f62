"""delivery_hours and run_days: figures kept for the final past agree with working them out."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.db import make_engine
from manager.models import VERDICTS, Delivery, DeliveryHour, RunDay, Task, TaskRun
from manager.reports import reporting, rollups
from manager.reports.rollups import HOUR, SEAL_DELAY
from manager.reports.window import Window

NOW = datetime(2026, 3, 10, 12, 34, 56, 789000)
START = NOW - timedelta(days=3)


def add_deliveries(db: Session, times: list[tuple[datetime, str]]) -> None:
    db.add_all(
        Delivery(received_at=at, verdict=verdict, body_size=2, raw_body=b"{}")
        for at, verdict in times
    )
    db.commit()


def random_deliveries(rng: random.Random, n: int, start: datetime, end: datetime) -> list[Any]:
    span = (end - start).total_seconds()
    picks = []
    for _ in range(n):
        at = start + timedelta(seconds=rng.uniform(0, span))
        if rng.random() < 0.1:  # on the hour exactly, the edge case of every comparison
            at = rollups.floor_hour(at)
        picks.append((at.replace(microsecond=at.microsecond // 1000 * 1000), rng.choice(VERDICTS)))
    return picks


def counted(times: list[tuple[datetime, str]], window: Window) -> dict[str, int]:
    found = Counter(
        verdict
        for at, verdict in times
        if (window.since is None or at >= window.since)
        and (window.until is None or at < window.until)
    )
    return {verdict: found[verdict] for verdict in VERDICTS}


def hour_rows(db: Session) -> list[Any]:
    db.rollback()  # a fresh snapshot (SQLite keeps a read transaction's)
    return list(db.execute(select(DeliveryHour).order_by(DeliveryHour.hour)).scalars())


def test_summary_counts_match_every_row_for_random_windows(app: Any, db: Session) -> None:
    rng = random.Random(7)
    times = random_deliveries(rng, 400, START, NOW)
    add_deliveries(db, times)
    edges = [None, START - HOUR, NOW, NOW + HOUR, *(t for t, _ in rng.sample(times, 20))]
    edges += [START + timedelta(seconds=rng.uniform(0, 3 * 86400)) for _ in range(20)]
    for _ in range(60):
        since, until = rng.choice(edges), rng.choice(edges)
        if since is not None and until is not None and since > until:
            since, until = until, since
        window = Window(since, until)
        got = reporting.summary(db, window, now=NOW)["deliveries"]
        db.rollback()
        assert got == counted(times, window), window
    assert hour_rows(db), "the hourly rows were never used"


def test_only_final_hours_are_written_and_later_deliveries_still_count(
    app: Any, db: Session
) -> None:
    times = [(START + timedelta(minutes=17 * i), VERDICTS[i % 4]) for i in range(250)]
    add_deliveries(db, times)
    assert reporting.summary(db, now=NOW)["deliveries"] == counted(times, Window())
    rows = hour_rows(db)
    assert rows[0].hour == rollups.floor_hour(START)
    assert rows[-1].hour + HOUR == rollups.floor_hour(NOW - SEAL_DELAY)
    assert rows[-1].hour + HOUR <= NOW - timedelta(hours=1), "an hour written too soon"
    # One row per hour, none missing, and the rows add up to the deliveries they cover.
    assert [r.hour for r in rows] == [rows[0].hour + i * HOUR for i in range(len(rows))]
    covered = Window(rows[0].hour, rows[-1].hour + HOUR)
    assert sum(r.applied + r.duplicate + r.stale + r.rejected for r in rows) == sum(
        counted(times, covered).values()
    )

    # A delivery that arrives now lands in an hour that was not written: it counts.
    late = [(NOW - timedelta(minutes=1), "stale")]
    add_deliveries(db, late)
    assert reporting.summary(db, now=NOW)["deliveries"] == counted(times + late, Window())

    # An hour later, the run of rows grows by one hour and the counts stay right.
    later = NOW + HOUR
    assert reporting.summary(db, now=later)["deliveries"] == counted(times + late, Window())
    grown = hour_rows(db)
    assert len(grown) == len(rows) + 1
    assert grown[-1].hour + HOUR == rollups.floor_hour(later - SEAL_DELAY)


def test_fill_is_idempotent(app: Any, db: Session, database_url: str) -> None:
    times = random_deliveries(random.Random(3), 100, START, NOW)
    add_deliveries(db, times)
    engine = make_engine(database_url)
    try:
        first = rollups.fill(engine, NOW)
        again = rollups.fill(engine, NOW)
    finally:
        engine.dispose()
    assert first == again == rollups.floor_hour(NOW - SEAL_DELAY)
    rows = hour_rows(db)
    first_hour = rollups.floor_hour(min(at for at, _ in times))
    assert len({r.hour for r in rows}) == len(rows) == (first - first_hour) / HOUR


def test_no_deliveries_no_rows(app: Any, db: Session) -> None:
    assert reporting.summary(db, now=NOW)["deliveries"] == dict.fromkeys(VERDICTS, 0)
    assert hour_rows(db) == []


def test_only_recent_deliveries_no_rows(app: Any, db: Session) -> None:
    times = [(NOW - timedelta(minutes=5), "applied")]
    add_deliveries(db, times)
    assert reporting.summary(db, now=NOW)["deliveries"] == counted(times, Window())
    assert hour_rows(db) == []


@pytest.mark.postgres
def test_read_only_database_counts_every_row(app: Any, db: Session, database_url: str) -> None:
    times = random_deliveries(random.Random(5), 200, START, NOW)
    add_deliveries(db, times)
    engine = make_engine(
        database_url, connect_args={"options": "-c default_transaction_read_only=on"}
    )
    try:
        with Session(engine) as session:
            window = Window(START + timedelta(minutes=90), NOW)
            assert reporting.summary(session, window, now=NOW)["deliveries"] == counted(
                times, window
            )
    finally:
        engine.dispose()
    assert db.scalar(select(func.count()).select_from(DeliveryHour)) == 0


# --- run_days -----------------------------------------------------------------------------


def add_run(db: Session, start: datetime, end: datetime | None) -> None:
    task = Task(
        app_id=1, task_id=f"t-{start.isoformat()}", owner="o", status="stopped", state_seq=1,
        state_rank=1, max_seq=1, runs=1, first_seen_at=start, updated_at=start,
    )  # fmt: skip
    db.add(task)
    db.flush()
    db.add(TaskRun(task_pk=task.id, run_no=1, owner="o", started_at=start, ended_at=end,
                   stop_reason=None if end is None else 0))  # fmt: skip
    db.commit()


def day_rows(db: Session) -> list[Any]:
    db.rollback()
    return list(db.execute(select(RunDay).order_by(RunDay.day)).scalars())


def test_run_days_only_for_days_over_for_longer_than_callbacks_can_reach_back(
    app: Any, db: Session
) -> None:
    for i in range(12):
        add_run(db, START - timedelta(days=9) + i * timedelta(hours=19), None)
    window = Window(START - timedelta(days=10), NOW)
    rows = reporting.daily(db, window, now=NOW)
    stored = day_rows(db)
    assert stored, "run_days were never written"
    assert stored[-1].day == rollups.final_days_until(NOW) - timedelta(days=1)
    last_day_end = datetime.combine(stored[-1].day + timedelta(days=1), datetime.min.time())
    assert last_day_end <= NOW - timedelta(days=7), "a day written while callbacks may reach it"
    # Stored days give the same figures the runs do.
    db.rollback()
    worked_out = reporting.day_figures(db, reporting.daily_window(window, NOW), None, NOW)
    assert [(row.started, row.stopped, row.failed, row.ended_unseen) for row in rows] == [
        (started, stopped, failed, unseen) for _, started, stopped, failed, unseen, _ in worked_out
    ]
    assert [row.transcoding_seconds for row in rows] == [
        (us + 500_000) // 1_000_000 for *_, us in worked_out
    ]


def test_run_days_none_without_final_days(app: Any, db: Session) -> None:
    add_run(db, NOW - timedelta(days=2), NOW - timedelta(days=1))
    reporting.daily(db, Window(NOW - timedelta(days=3), NOW), now=NOW)
    assert day_rows(db) == []


@pytest.mark.postgres
def test_read_only_database_works_the_days_out(app: Any, db: Session, database_url: str) -> None:
    for i in range(5):
        add_run(db, START - timedelta(days=20) + i * timedelta(days=1, hours=3), None)
    engine = make_engine(
        database_url, connect_args={"options": "-c default_transaction_read_only=on"}
    )
    window = Window(START - timedelta(days=21), NOW)
    try:
        with Session(engine) as session:
            read_only = reporting.daily(session, window, now=NOW)
    finally:
        engine.dispose()
    assert day_rows(db) == []
    assert read_only == reporting.daily(db, window, now=NOW)
    assert day_rows(db), "run_days were never written"
