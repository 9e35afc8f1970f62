"""Concurrent deliveries from several processes end in the serial state (PostgreSQL)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.config import Settings
from manager.models import Delivery, Task, TaskRun

from ..conftest import APP_ID, CALLBACK_SECRET, callback
from ..live import gunicorn
from .lifecycles import MAX_SPAN, random_lifecycle
from .test_history_property import body as history_body

pytestmark = pytest.mark.postgres

THREADS = 8
TASKS = 25


def live_env(settings: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_CALLBACK_SECRET": CALLBACK_SECRET,
        "SECRET_KEY": "concurrency-test",
    }


def lifecycle(task_id: str, t0: int) -> list[dict[str, object]]:
    return [
        callback(task_id=task_id, user_id=f"u-{task_id}", sequence=1, timestamp=t0),
        callback(
            task_id=task_id,
            user_id=f"u-{task_id}",
            sequence=2,
            status="TranscodeUpdated",
            timestamp=t0 + 5,
        ),
        callback("transcode_stop", task_id=task_id, sequence=3, timestamp=t0 + 60),
    ]


def post_all(base: str, bodies: list[dict[str, object]]) -> list[int]:
    local = threading.local()

    def post(body: dict[str, object]) -> int:
        if not hasattr(local, "http"):
            local.http = requests.Session()
        response = local.http.post(
            f"{base}/callbacks/zego",
            data=json.dumps(body),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        return response.status_code

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(post, bodies))


def test_shuffled_lifecycles_from_eight_threads(app: Any, settings: Settings, db: Session) -> None:
    task_ids = [f"conc-{i}" for i in range(TASKS)]
    t0 = int(time.time()) - 100  # taken per test: a slow suite must not age it out
    bodies = [b for t in task_ids for b in lifecycle(t, t0)]
    bodies = bodies + [dict(b) for b in bodies]  # every delivery twice
    random.Random(7).shuffle(bodies)

    with gunicorn(live_env(settings)) as base:
        statuses = post_all(base, bodies)

    assert Counter(statuses) == {200: len(bodies)}
    tasks = {t.task_id: t for t in db.execute(select(Task)).scalars()}
    assert sorted(tasks) == sorted(task_ids)
    for task_id, task in tasks.items():
        assert (task.status, task.owner, task.max_seq, task.stop_reason) == (
            "stopped",
            f"u-{task_id}",
            3,
            0,
        )
        assert task.started_at == datetime.fromtimestamp(t0, UTC).replace(tzinfo=None)
        assert task.ended_at == datetime.fromtimestamp(t0 + 60, UTC).replace(tzinfo=None)
    verdicts = Counter(db.execute(select(Delivery.verdict)).scalars())
    assert verdicts["duplicate"] == len(bodies) // 2
    assert verdicts["applied"] + verdicts["stale"] == len(bodies) // 2
    assert verdicts["rejected"] == 0


def test_the_same_event_at_the_same_moment_applies_once(
    app: Any, settings: Settings, db: Session
) -> None:
    # Each round: the same start, as THREADS distinct resends (new Timestamp and Nonce),
    # released together. Exactly one may apply; the rest are duplicates.
    rounds = 10
    t0 = int(time.time()) - 100
    with gunicorn(live_env(settings)) as base:
        for r in range(rounds):
            bodies = [
                callback(task_id=f"race-{r}", sequence=1, timestamp=t0 + i) for i in range(THREADS)
            ]
            barrier = threading.Barrier(THREADS)

            def post(body: dict[str, object], barrier: threading.Barrier = barrier) -> str:
                barrier.wait()
                response = requests.post(
                    f"{base}/callbacks/zego",
                    data=json.dumps(body),
                    headers={"Content-Type": "application/json"},
                    timeout=30,
                )
                assert response.status_code == 200
                verdict: str = response.json()["verdict"]
                return verdict

            with ThreadPoolExecutor(THREADS) as pool:
                verdicts = Counter(pool.map(post, bodies))
            assert verdicts == {"applied": 1, "duplicate": THREADS - 1}
    assert db.execute(select(Task.status).distinct()).scalars().all() == ["running"]


def test_random_lifecycles_from_eight_processes_end_as_sorted_arrival(
    app: Any, client: Any, settings: Settings, db: Session
) -> None:
    """Random lifecycles (restarts, lost starts and stops, failures with Sequence 0,
    updates without one), every delivery once or twice, shuffled and posted by 8
    threads to 8 gunicorn workers: each task and its runs end as when its deliveries
    came one by one in sorted order."""
    rng = random.Random(11)
    t0 = int(time.time()) - MAX_SPAN // 2
    lifecycles = [random_lifecycle(rng, requests=False) for _ in range(TASKS)]
    bodies = []
    for n, steps in enumerate(lifecycles):
        for step in sorted(steps, key=lambda s: (s.sequence, s.kind != "start", s.kind)):
            reference = history_body(step, f"ref-{n}", f"u-{n}", t0)
            assert client.post("/callbacks/zego", json=reference).status_code == 200
        for step in steps:
            body = history_body(step, f"conc-{n}", f"u-{n}", t0)
            bodies += [body] * rng.choice([1, 2])
    rng.shuffle(bodies)

    with gunicorn(live_env(settings), workers=THREADS) as base:
        statuses = post_all(base, bodies)
    assert Counter(statuses) == {200: len(bodies)}

    db.rollback()
    for n in range(TASKS):
        assert task_and_runs(db, f"conc-{n}") == task_and_runs(db, f"ref-{n}"), lifecycles[n]


def task_and_runs(db: Session, task_id: str) -> tuple[Any, ...]:
    task = db.execute(select(Task).where(Task.task_id == task_id)).scalar_one()
    runs = db.execute(
        select(TaskRun.run_no, TaskRun.owner, TaskRun.started_at, TaskRun.ended_at)
        .add_columns(TaskRun.stop_reason)
        .where(TaskRun.task_pk == task.id)
        .order_by(TaskRun.run_no)
    ).all()
    row = (
        task.status,
        task.stop_reason,
        task.owner,
        task.runs,
        task.started_at,
        task.ended_at,
        task.state_seq,
        task.state_rank,
        task.max_seq,
        task.last_failure_at,
        task.run_start_seen,
    )
    return row, [tuple(r) for r in runs]
