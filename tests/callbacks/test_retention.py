"""Delivery retention (manager/callbacks/retention.py), on SQLite and PostgreSQL.

Histories are made through the webhook (it only takes fresh callbacks), then moved
into the past whole (`age`): every time of a task, its runs, deliveries and stop
requests goes back by the same amount, which the rules cannot tell from the real thing.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.orm import Session

from manager.callbacks.history import utc_from_timestamp
from manager.callbacks.rebuild import rebuild
from manager.callbacks.retention import prune, prune_batch, rows_until
from manager.clock import utcnow
from manager.db import write_connection
from manager.migrate import downgrade, upgrade
from manager.models import (
    Delivery,
    DeliveryHour,
    PrunedHistory,
    StopAttempt,
    StopRequest,
    Task,
    TaskRun,
)
from manager.reports import reporting, rollups
from manager.reports.window import Window

from ..conftest import callback
from .lifecycles import MAX_SPAN, Step, lifecycles, random_lifecycle
from .test_history_property import accept_stop, body, state
from .test_history_property import deliver as deliver_steps

RETENTION_DAYS = 90
OLD = timedelta(days=200)
RECENT = timedelta(days=10)


# --- making histories ---------------------------------------------------------------------


def post(client: FlaskClient, body: dict[str, object]) -> str:
    response = client.post(
        "/callbacks/zego", data=json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 200, response.json
    return str(response.json["verdict"])  # type: ignore[index]


def reject(client: FlaskClient, n: int) -> None:
    """n requests refused for their signature: recorded as rejected, with no task."""
    for _ in range(n):
        body = callback(task_id="forged", secret="not-the-secret")
        response = client.post(
            "/callbacks/zego", data=json.dumps(body), content_type="application/json"
        )
        assert response.status_code == 401


def stop_and_start(
    client: FlaskClient, task_id: str, *, seq: int = 1, at: int | None = None
) -> None:
    """A run: TranscodeStarted, a resend of it with a new nonce (duplicate), a stop."""
    t0 = at or int(time.time()) - 100
    assert post(client, callback(task_id=task_id, sequence=seq, timestamp=t0)) == "applied"
    assert post(client, callback(task_id=task_id, sequence=seq, timestamp=t0 + 3)) == "duplicate"
    stop = callback("transcode_stop", task_id=task_id, sequence=seq + 1, timestamp=t0 + 60)
    assert post(client, stop) == "applied"


def age(db: Session, task_ids: Iterable[str], by: timedelta, *, rejected: bool = False) -> None:
    """Move these tasks' whole history `by` into the past (and the rejected deliveries')."""
    db.rollback()
    tasks = list(db.execute(select(Task).where(Task.task_id.in_(list(task_ids)))).scalars())
    pks = [t.id for t in tasks]
    seconds = int(by.total_seconds())

    def back(row: Any, *names: str) -> None:
        for name in names:
            if getattr(row, name) is not None:
                setattr(row, name, getattr(row, name) - by)

    for task in tasks:
        back(task, "first_seen_at", "updated_at", "last_delivery_at", "started_at", "ended_at")
        back(task, "last_failure_at")
    for run in db.execute(select(TaskRun).where(TaskRun.task_pk.in_(pks))).scalars():
        back(run, "started_at", "ended_at")
    owned = Delivery.task_pk.in_(pks)
    if rejected:
        owned = owned | Delivery.task_pk.is_(None)
    for delivery in db.execute(select(Delivery).where(owned)).scalars():
        back(delivery, "received_at")
        if delivery.zego_timestamp is not None:
            delivery.zego_timestamp -= seconds
    stops = list(db.execute(select(StopRequest).where(StopRequest.task_pk.in_(pks))).scalars())
    for stop in stops:
        back(stop, "created_at", "next_attempt_at", "completed_at", "claimed_until")
    attempts = select(StopAttempt).where(StopAttempt.stop_request_id.in_([s.id for s in stops]))
    for attempt in db.execute(attempts).scalars():
        back(attempt, "attempted_at")
    db.commit()


def make_lifecycles(app: Flask, client: FlaskClient, count: int, seed: int) -> list[str]:
    """`count` random lifecycles (1-3 runs, lost starts and stops, failures with Sequence
    0, updates, our accepted stops), each in a shuffled order with a resend or two."""
    rng = random.Random(seed)
    task_ids = []
    for n in range(count):
        steps = random_lifecycle(rng)
        order = list(range(len(steps)))
        rng.shuffle(order)
        order += [i for i in rng.sample(order, k=min(2, len(order))) if steps[i].kind != "request"]
        t0 = int(time.time()) - MAX_SPAN // 2
        task_ids.append(deliver_steps(app, client, steps, order, f"owner-{seed}-{n}", t0))
    return task_ids


# --- what must not change -------------------------------------------------------------------


def floor_hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def windows(now: datetime) -> list[Window]:
    """All time, the recent past, and windows of the pruned past. Inside the pruned past
    a window starts and ends on the hour: a partial hour is counted from the deliveries
    themselves (see retention.py)."""
    old = floor_hour(now - OLD)
    return [
        Window(),
        Window(now - timedelta(days=30), now),
        Window(floor_hour(now - timedelta(days=400)), now),
        Window(old - timedelta(days=1), old + timedelta(days=1)),
        Window(old - timedelta(hours=3), now - RECENT),
        Window(None, floor_hour(now - timedelta(days=100))),
    ]


def figures(db: Session, now: datetime) -> dict[str, Any]:
    """Every report over every window (per owner, all but the delivery counts)."""
    db.rollback()
    owners = sorted(o for o in db.execute(select(Task.owner).distinct()).scalars() if o)
    out: dict[str, Any] = {"stuck": list(reporting.stuck(db, now))}
    for n, window in enumerate(windows(now)):
        out[f"summary {n}"] = reporting.summary(db, window, now=now)
        out[f"owners {n}"] = list(reporting.owners(db, window, now=now))
        out[f"daily {n}"] = list(reporting.daily(db, window, None, now))
        for owner in owners:
            one = reporting.summary(db, window, owner=owner, now=now)
            out[f"summary {n} {owner}"] = {k: v for k, v in one.items() if k != "deliveries"}
            out[f"daily {n} {owner}"] = list(reporting.daily(db, window, owner, now))
    db.rollback()
    return out


def tasks_as_served(client: FlaskClient, auth: dict[str, str], db: Session) -> dict[str, Any]:
    """GET /api/tasks/<id> of every task, but its deliveries (and an open run's growing
    seconds); and every task's runs as stored."""
    db.rollback()
    served = {}
    for task_id in db.execute(select(Task.task_id).order_by(Task.id)).scalars():
        answer = client.get(f"/api/tasks/{task_id}", headers=auth)
        assert answer.status_code == 200, answer.json
        body = dict(answer.json)  # type: ignore[arg-type]
        del body["deliveries"]
        for run in body["runs"]:
            if run["ended_at"] is None:
                del run["seconds"]
        served[task_id] = body
    runs = db.execute(
        select(TaskRun.task_pk, TaskRun.run_no, TaskRun.owner, TaskRun.started_at)
        .add_columns(TaskRun.ended_at, TaskRun.stop_reason)
        .order_by(TaskRun.task_pk, TaskRun.run_no)
    ).all()
    db.rollback()
    return {"served": served, "runs": [tuple(r) for r in runs]}


def deliveries(db: Session) -> dict[int, tuple[Any, ...]]:
    """id: (task_id, verdict, whether it has its body)."""
    db.rollback()
    rows = db.execute(select(Delivery.id, Delivery.task_id, Delivery.verdict, Delivery.raw_body))
    return {r.id: (r.task_id, r.verdict, r.raw_body is not None) for r in rows}


def seal(app: Flask, now: datetime) -> None:
    """delivery_hours written up to now's final hour, as the worker does before pruning."""
    rollups.fill(app.extensions["manager.engine"], now)


def run_prune(app: Flask, now: datetime, **kw: Any) -> Any:
    return prune(app.extensions["manager.engine"], now=now, retention_days=RETENTION_DAYS, **kw)


# --- the tests --------------------------------------------------------------------------------


def test_pruning_removes_exactly_what_the_design_says(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    stop_and_start(client, "over")  # stopped: events, a duplicate
    t0 = int(time.time()) - 100
    post(client, callback(task_id="failed", sequence=1, timestamp=t0))
    post(client, callback("transcode_stop", task_id="failed", sequence=0, stop_reason=1))
    post(client, callback(task_id="running", sequence=1, timestamp=t0))  # still running
    stop_and_start(client, "heard-since")  # stopped, but a resend came in the retention
    stop_and_start(client, "asked-since")  # stopped, but a stop request queued since
    stop_and_start(client, "recent")  # within the retention
    reject(client, 3)
    age(db, ["over", "failed", "running", "heard-since", "asked-since"], OLD, rejected=True)
    age(db, ["recent"], RECENT)
    late = callback(task_id="heard-since", sequence=1, timestamp=int(time.time()) - 5)
    assert post(client, late) == "duplicate"
    asked = db.execute(select(Task.id).where(Task.task_id == "asked-since")).scalar_one()
    now = utcnow()
    db.execute(
        insert(StopRequest).values(
            task_pk=asked, state="queued", user_id="user-1", requested_by="ops", force=True,
            created_at=now - OLD, attempts=0, next_attempt_at=now,
        )
    )  # fmt: skip
    db.commit()
    before = deliveries(db)
    seal(app, now)

    pruned = run_prune(app, now)

    after = deliveries(db)
    gone = {i: before[i] for i in before.keys() - after.keys()}
    assert sorted(d[:2] for d in gone.values()) == sorted(
        [("over", "applied"), ("over", "duplicate"), ("over", "applied")]
        + [("failed", "applied")] * 2
        + [("heard-since", "duplicate"), ("asked-since", "duplicate")]
        + [("forged", "rejected")] * 3
    )
    # Every delivery kept from the pruned past lost its body, and only those.
    cutoff = now - timedelta(days=RETENTION_DAYS)
    db.rollback()
    old = set(db.execute(select(Delivery.id).where(Delivery.received_at < cutoff)).scalars())
    assert {i for i, d in after.items() if not d[2]} == old
    assert sorted(after[i][:2] for i in old) == sorted(
        [("running", "applied")]
        + [("heard-since", "applied")] * 2
        + [("asked-since", "applied")] * 2
    )
    assert sum(1 for d in after.values() if d[0] == "recent") == 3
    marks = {
        task_id: (runs, before)
        for task_id, runs, before in db.execute(
            select(Task.task_id, PrunedHistory.runs, PrunedHistory.events_before).join(
                PrunedHistory, PrunedHistory.task_pk == Task.id
            )
        )
    }
    assert marks == {"over": (1, cutoff), "failed": (1, cutoff)}
    assert (pruned.deliveries, pruned.tasks, pruned.bodies) == (len(gone), 2, len(old))
    assert pruned.done
    assert pruned.cutoff == pruned.rows_until == cutoff

    again = run_prune(app, now)
    assert (again.deliveries, again.tasks, again.bodies) == (0, 0, 0)
    assert deliveries(db) == after


def test_rows_wait_for_delivery_hours(app: Flask, client: FlaskClient, db: Session) -> None:
    """Until delivery_hours holds an hour, its deliveries keep their rows (not their
    bodies): summary would otherwise lose them."""
    stop_and_start(client, "a")
    reject(client, 2)
    age(db, ["a"], OLD, rejected=True)
    now = utcnow()
    pruned = run_prune(app, now)
    assert (pruned.rows_until, pruned.deliveries, pruned.tasks, pruned.bodies) == (None, 0, 0, 5)
    assert all(not has_body for *_, has_body in deliveries(db).values())

    first = floor_hour(db.execute(select(func.min(Delivery.received_at))).scalar_one())
    db.rollback()
    with write_connection(app.extensions["manager.engine"]) as conn:
        conn.execute(
            insert(DeliveryHour).values(
                hour=first - timedelta(hours=1), applied=0, duplicate=0, stale=0, rejected=0
            )
        )
        # The hours after it are not there yet: nothing of theirs goes.
        assert rows_until(conn, now) == first
    assert run_prune(app, now).deliveries == 0
    seal(app, now)
    assert run_prune(app, now).deliveries == 5


def test_pruning_changes_no_task_and_no_report(
    app: Flask, client: FlaskClient, db: Session, runner: FlaskCliRunner, auth: dict[str, str]
) -> None:
    old = make_lifecycles(app, client, 14, seed=1)
    recent = make_lifecycles(app, client, 3, seed=2)
    fresh = make_lifecycles(app, client, 3, seed=3)
    for n in range(4):
        stop_and_start(client, f"extra-{n}", at=int(time.time()) - 200 + n)
    reject(client, 4)
    age(db, old + [f"extra-{n}" for n in range(4)], OLD, rejected=True)
    age(db, recent, RECENT)
    now = utcnow()
    seal(app, now)
    served, reported = tasks_as_served(client, auth, db), figures(db, now)

    pruned = run_prune(app, now, batch_size=7)

    assert pruned.done
    assert min(pruned.deliveries, pruned.tasks, pruned.bodies) > 0
    assert pruned.batches > 7
    assert tasks_as_served(client, auth, db) == served
    assert figures(db, now) == reported
    for task_id in fresh:
        answer = client.get(f"/api/tasks/{task_id}", headers=auth).json
        assert answer["deliveries"]  # type: ignore[index]

    # manager rebuild recomputes the pruned tasks from what stands in for their events.
    with app.extensions["manager.engine"].connect() as conn:
        assert [c for batch in rebuild(conn, now=now, dry_run=True) for c in batch] == []
    result = runner.invoke(args=["rebuild"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "0 task(s) changed"
    assert tasks_as_served(client, auth, db) == served
    assert figures(db, now) == reported


def test_the_unfiltered_summary_keeps_counting_pruned_deliveries(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    """Whole hours come from delivery_hours; a summary for one owner counts deliveries
    themselves, so over the pruned past it counts only those kept (the documented limit)."""
    stop_and_start(client, "a")
    reject(client, 2)
    age(db, ["a"], OLD, rejected=True)
    now = utcnow()
    window = Window(floor_hour(now - OLD) - timedelta(days=1), now)
    seal(app, now)
    before = reporting.summary(db, window, now=now)["deliveries"]
    owner_before = reporting.summary(db, window, owner="user-1", now=now)["deliveries"]
    db.rollback()
    assert before == {"applied": 2, "duplicate": 1, "stale": 0, "rejected": 2}
    assert owner_before == {"applied": 2, "duplicate": 1, "stale": 0, "rejected": 0}
    run_prune(app, now)
    assert reporting.summary(db, window, now=now)["deliveries"] == before
    owner_after = reporting.summary(db, window, owner="user-1", now=now)["deliveries"]
    assert owner_after == {"applied": 0, "duplicate": 0, "stale": 0, "rejected": 0}


def test_batches_are_bounded(app: Flask, client: FlaskClient, db: Session) -> None:
    for n in range(10):
        stop_and_start(client, f"b-{n}", at=int(time.time()) - 200 + n)  # 3 rows each
    reject(client, 5)
    age(db, [f"b-{n}" for n in range(10)], OLD, rejected=True)
    now = utcnow()
    seal(app, now)
    cutoff = now - timedelta(days=RETENTION_DAYS)
    engine = app.extensions["manager.engine"]
    with engine.connect() as conn:
        until = rows_until(conn, cutoff)
    after, batches = 0, []
    while True:
        with write_connection(engine) as conn:
            batch = prune_batch(
                conn, after_id=after, batch_size=10, cutoff=cutoff, rows_until=until
            )
        batches.append(batch)
        if batch.done:
            break
        after = batch.last_id
    assert len(batches) >= 4
    assert all(b.seen <= 10 and b.deliveries <= 10 and b.tasks <= 10 for b in batches)
    assert sum(b.deliveries for b in batches) == 35
    db.rollback()
    assert db.execute(select(func.count()).select_from(Delivery)).scalar_one() == 0

    # max_batches stops early; the next call resumes where it left off.
    stop_and_start(client, "c")
    reject(client, 24)
    age(db, ["c"], OLD, rejected=True)
    seal(app, utcnow())
    first = run_prune(app, utcnow(), batch_size=10, max_batches=2)
    assert (first.batches, first.deliveries, first.done) == (2, 20, False)
    rest = run_prune(app, utcnow(), batch_size=10, after_id=first.resume_after)
    assert (rest.deliveries, rest.done, rest.resume_after) == (7, True, 0)


def test_callbacks_between_batches_are_applied(
    app: Flask, client: FlaskClient, db: Session, auth: dict[str, str]
) -> None:
    """A pruned task restarts, an old running task stops, a new task starts, all while a
    prune is half done."""
    t0 = int(time.time()) - 100
    stop_and_start(client, "pruned", at=t0)
    post(client, callback(task_id="still-running", sequence=1, timestamp=t0))
    reject(client, 30)
    age(db, ["pruned", "still-running"], OLD, rejected=True)
    now = utcnow()
    seal(app, now)
    first = run_prune(app, now, batch_size=10, max_batches=1)
    assert (first.tasks, first.done) == (1, False)

    t1 = int(time.time()) - 30
    assert post(client, callback(task_id="pruned", sequence=5, timestamp=t1)) == "applied"
    stop = callback("transcode_stop", task_id="pruned", sequence=6, timestamp=t1 + 20)
    assert post(client, stop) == "applied"
    stop = callback("transcode_stop", task_id="still-running", sequence=2, timestamp=t1)
    assert post(client, stop) == "applied"
    assert post(client, callback(task_id="new", sequence=1, timestamp=t1)) == "applied"

    rest = run_prune(app, now, batch_size=10, after_id=first.resume_after)
    assert rest.done
    shown = {
        task_id: client.get(f"/api/tasks/{task_id}", headers=auth).json
        for task_id in ("pruned", "still-running", "new")
    }
    runs = {
        k: [(r["started_at"], r["ended_at"], r["ended"]) for r in v["runs"]]
        for k, v in shown.items()
    }  # type: ignore[index]
    old_start = (utc_from_timestamp(t0) - OLD).isoformat() + "Z"
    old_end = (utc_from_timestamp(t0 + 60) - OLD).isoformat() + "Z"

    def iso(ts: int) -> str:
        return utc_from_timestamp(ts).isoformat() + "Z"

    assert runs["pruned"] == [(old_start, old_end, "stopped"), (iso(t1), iso(t1 + 20), "stopped")]
    assert runs["still-running"] == [(old_start, iso(t1), "stopped")]
    assert runs["new"] == [(iso(t1), None, None)]
    statuses = {k: (v["task"]["status"], v["task"]["sequence"]) for k, v in shown.items()}  # type: ignore[index]
    assert statuses == {
        "pruned": ("stopped", 6),
        "still-running": ("stopped", 2),
        "new": ("running", 1),
    }
    # The restart's deliveries are the pruned task's events now, and stay.
    assert [d["sequence"] for d in shown["pruned"]["deliveries"]] == [6, 5]  # type: ignore[index]
    with app.extensions["manager.engine"].connect() as conn:
        assert [c for batch in rebuild(conn, now=utcnow(), dry_run=True) for c in batch] == []


def test_callbacks_during_a_prune_in_another_thread(
    app: Flask, client: FlaskClient, db: Session, auth: dict[str, str]
) -> None:
    """Whether a task's history was pruned before or after its callback came, the task
    ends the same."""
    names = [f"t-{n}" for n in range(24)]
    for n, task_id in enumerate(names):
        stop_and_start(client, task_id, at=int(time.time()) - 200 + n)
    age(db, names, OLD)
    now = utcnow()
    seal(app, now)
    done = threading.Event()
    results: list[Any] = []

    def pruner() -> None:
        try:
            results.append(run_prune(app, now, batch_size=3, pause=0.01))
        finally:
            done.set()

    thread = threading.Thread(target=pruner)
    thread.start()
    t1 = int(time.time()) - 60
    for n, task_id in enumerate(names[::2]):
        assert post(client, callback(task_id=task_id, sequence=10, timestamp=t1 + n)) == "applied"
        stop = callback("transcode_stop", task_id=task_id, sequence=11, timestamp=t1 + n + 30)
        assert post(client, stop) == "applied"
    thread.join(timeout=120)
    assert done.is_set()
    assert [r.done for r in results] == [True]
    for n, task_id in enumerate(names):
        task = client.get(f"/api/tasks/{task_id}", headers=auth).json["task"]  # type: ignore[index]
        assert (task["status"], task["runs"]) == ("stopped", 2 if n % 2 == 0 else 1), task_id
    with app.extensions["manager.engine"].connect() as conn:
        assert [c for batch in rebuild(conn, now=utcnow(), dry_run=True) for c in batch] == []


def test_a_pruned_task_refolds_from_its_last_run(
    app: Flask, client: FlaskClient, db: Session, runner: FlaskCliRunner
) -> None:
    """After pruning, run 1 stands in for the deleted events: `manager rebuild` folds the
    events since onto it, and puts a damaged task back."""
    stop_and_start(client, "p")
    age(db, ["p"], OLD)
    now = utcnow()
    seal(app, now)
    assert run_prune(app, now).tasks == 1
    t1 = int(time.time()) - 30
    assert post(client, callback(task_id="p", sequence=3, timestamp=t1)) == "applied"
    assert (
        post(client, callback("transcode_stop", task_id="p", sequence=4, timestamp=t1 + 9))
        == "applied"
    )
    db.rollback()
    task = db.execute(select(Task).where(Task.task_id == "p")).scalar_one()
    assert (task.status, task.runs, task.state_seq) == ("stopped", 2, 4)
    assert db.get(PrunedHistory, task.id).runs == 1  # type: ignore[union-attr]
    expected = db.execute(
        select(TaskRun.run_no, TaskRun.started_at, TaskRun.ended_at, TaskRun.stop_reason)
        .where(TaskRun.task_pk == task.id)
        .order_by(TaskRun.run_no)
    ).all()
    db.execute(text("UPDATE tasks SET status = 'running', ended_at = NULL"))
    db.execute(text("UPDATE task_runs SET ended_at = NULL, stop_reason = NULL WHERE run_no = 2"))
    db.commit()
    result = runner.invoke(args=["rebuild"])
    assert "p: status running -> stopped" in result.output
    assert "1 task(s) changed" in result.output
    db.rollback()
    assert (
        db.execute(
            select(TaskRun.run_no, TaskRun.started_at, TaskRun.ended_at, TaskRun.stop_reason)
            .where(TaskRun.task_pk == task.id)
            .order_by(TaskRun.run_no)
        ).all()
        == expected
    )
    db.rollback()
    assert db.execute(select(Task.status).where(Task.task_id == "p")).scalar_one() == "stopped"


@pytest.mark.postgres
def test_one_process_prunes_at_a_time(app: Flask, client: FlaskClient, db: Session) -> None:
    """Several workers may run: while one prunes, another's call returns at once."""
    stop_and_start(client, "a")
    age(db, ["a"], OLD)
    now = utcnow()
    seal(app, now)
    key = "hashtext('manager.delivery_retention')"
    with app.extensions["manager.engine"].connect() as other:
        assert other.scalar(text(f"SELECT pg_try_advisory_lock({key})"))
        busy = run_prune(app, now)
        assert (busy.busy, busy.batches, busy.done) == (True, 0, False)
        other.execute(text(f"SELECT pg_advisory_unlock({key})"))
        other.commit()
    pruned = run_prune(app, now)
    assert (pruned.busy, pruned.deliveries) == (False, 3)


def test_a_late_callback_for_a_pruned_task_keeps_its_runs(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    """ZEGOCLOUD's own stop of a restarted run carries Sequence 0, below the restart: the
    webhook refolds, from what stands in for the pruned events."""
    stop_and_start(client, "p")
    age(db, ["p"], OLD)
    now = utcnow()
    seal(app, now)
    assert run_prune(app, now).tasks == 1
    t1 = int(time.time()) - 30
    assert post(client, callback(task_id="p", sequence=3, timestamp=t1)) == "applied"
    failure = callback("transcode_stop", task_id="p", sequence=0, stop_reason=1, timestamp=t1 + 9)
    assert post(client, failure) == "applied"
    db.rollback()
    task = db.execute(select(Task).where(Task.task_id == "p")).scalar_one()
    runs = db.execute(
        select(TaskRun.ended_at, TaskRun.stop_reason)
        .where(TaskRun.task_pk == task.id)
        .order_by(TaskRun.run_no)
    ).all()
    assert (task.status, task.runs) == ("failed", 2)
    assert [tuple(r) for r in runs][1] == (utc_from_timestamp(t1 + 9), 1)


def test_pruning_leaves_the_task_row_as_it_was(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    """Its registers keep what the pruned events gave them, as if those were still there."""
    t0 = int(time.time()) - 100
    post(client, callback(task_id="f", sequence=7, timestamp=t0))
    failure = callback("transcode_stop", task_id="f", sequence=0, stop_reason=1, timestamp=t0 + 5)
    post(client, failure)
    age(db, ["f"], OLD)
    now = utcnow()
    seal(app, now)
    columns = [c for c in Task.__table__.columns]

    def row() -> tuple[Any, ...]:
        db.rollback()
        return tuple(db.execute(select(*columns).where(Task.task_id == "f")).one())

    before = row()
    assert run_prune(app, now).tasks == 1
    assert row() == before
    db.rollback()
    mark = db.execute(select(PrunedHistory)).scalar_one()
    assert (mark.runs, mark.start_seen) == (1, True)


@pytest.mark.postgres
def test_a_batch_holds_up_no_callback(app: Flask, client: FlaskClient, db: Session) -> None:
    """While a batch marks a task (its transaction still open), a callback for that task
    goes through at once."""
    stop_and_start(client, "quiet")
    age(db, ["quiet"], OLD)
    now = utcnow()
    seal(app, now)
    cutoff = now - timedelta(days=RETENTION_DAYS)
    engine = app.extensions["manager.engine"]
    answers: list[str] = []

    def restart() -> None:
        t1 = int(time.time()) - 10
        answers.append(post(client, callback(task_id="quiet", sequence=5, timestamp=t1)))

    with write_connection(engine) as conn:
        batch = prune_batch(conn, after_id=0, batch_size=10, cutoff=cutoff, rows_until=cutoff)
        assert (batch.tasks, batch.deliveries) == (1, 3)
        thread = threading.Thread(target=restart)
        thread.start()
        thread.join(timeout=5)  # the batch commits after this, whatever happened
        assert answers == ["applied"]
    thread.join()
    db.rollback()
    task = db.execute(select(Task).where(Task.task_id == "quiet")).scalar_one()
    assert (task.status, task.runs) == ("running", 2)


def test_the_downgrade_gives_pruned_deliveries_an_empty_body(scratch_engine: Engine) -> None:
    upgrade(scratch_engine)
    with scratch_engine.begin() as conn:
        conn.execute(
            insert(Delivery).values(
                received_at=datetime(2025, 1, 1), verdict="rejected", body_size=10, raw_body=None
            )
        )
    downgrade(scratch_engine, "0014")
    with scratch_engine.connect() as conn:
        assert conn.execute(text("SELECT raw_body FROM deliveries")).scalar_one() == b""
    upgrade(scratch_engine)


def deliver_to(
    app: Flask,
    client: FlaskClient,
    task_id: str,
    steps: list[Step],
    order: list[int],
    owner: str,
    t0: int,
) -> None:
    """Each step in `order` (an index twice is a resend) for this task, which exists."""
    for i in order:
        step = steps[i]
        if step.kind == "request":
            accept_stop(app, task_id, owner, step, t0)
            continue
        response = client.post(
            "/callbacks/zego",
            data=json.dumps(body(step, task_id, owner, t0)),
            content_type="application/json",
        )
        assert response.status_code == 200, response.json


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), old=lifecycles(), later=lifecycles())
def test_after_pruning_every_arrival_order_gives_the_sorted_state(
    app: Flask,
    client: FlaskClient,
    db: Session,
    data: st.DataObject,
    old: list[Step],
    later: list[Step],
) -> None:
    """Twin tasks with the same old history, pruned; then the same later lifecycle (its
    Sequences above the old ones, but those sent as 0) in sorted and in any order."""
    tag = uuid.uuid4().hex[:8]
    owners = (f"sorted-{tag}", f"shuffled-{tag}")
    order = list(range(len(old)))
    t0 = int(time.time()) - MAX_SPAN // 2
    twins = [deliver_steps(app, client, old, order, owner, t0) for owner in owners]
    age(db, twins, OLD)
    now = utcnow()
    seal(app, now)
    run_prune(app, now)
    above = max(s.sequence for s in old) + 1
    steps = [replace(s, sequence=s.sequence + above if s.sequence else 0) for s in later]
    by_position = sorted(
        range(len(steps)),
        key=lambda i: (
            steps[i].sequence,
            ["start", "update", "request", "stop"].index(steps[i].kind),
            steps[i].stop_reason or 0,
        ),
    )
    resent = data.draw(st.lists(st.sampled_from(range(len(steps))), max_size=2))
    shuffled = data.draw(st.permutations(list(range(len(steps))) + resent))
    # A stop request is ours: it is never resent.
    shuffled = [
        i for n, i in enumerate(shuffled) if steps[i].kind != "request" or i not in shuffled[:n]
    ]
    t1 = int(time.time()) - MAX_SPAN // 2
    deliver_to(app, client, twins[0], steps, by_position, owners[0], t1)
    deliver_to(app, client, twins[1], steps, shuffled, owners[1], t1)

    at = utcnow() + timedelta(seconds=MAX_SPAN)
    expected, got = state(db, twins[0], at), state(db, twins[1], at)
    assert got[0][:4] == expected[0][:4]
    assert got[0][5:] == expected[0][5:]  # the owner differs by design
    assert got[1:] == expected[1:]
    with app.extensions["manager.engine"].connect() as conn:
        assert [c for batch in rebuild(conn, now=at, dry_run=True) for c in batch] == []
