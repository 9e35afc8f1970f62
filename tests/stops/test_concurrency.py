"""Many operators and several workers stopping the same tasks at once (PostgreSQL).

Each stop must reach ZEGOCLOUD once it succeeds and never twice, every call for a
task must carry a new, higher Sequence, and nobody may get a 5xx.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.config import Settings
from manager.models import StopRequest
from manager.zego.fake import Failure
from manager.zego.fake_server import FakeServer

from ..conftest import APP_ID, CALLBACK_SECRET, SERVER_SECRET, callback
from ..live import gunicorn, manager_workers

pytestmark = pytest.mark.postgres

TASKS = 5
CALLERS_PER_TASK = 20
WORKERS = 4
INJECTED_FAILURES = 3
START_SEQUENCE = 7


def test_concurrent_stops_send_each_stop_once(
    app: object, settings: Settings, fake_zego: FakeServer, token: str, db: Session
) -> None:
    env = {
        "DATABASE_URL": settings.database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_SERVER_SECRET": SERVER_SECRET,
        "ZEGO_CALLBACK_SECRET": CALLBACK_SECRET,
        "ZEGO_API_URL": fake_zego.url,
        "SECRET_KEY": "stop-concurrency",
    }
    fake = fake_zego.fake
    task_ids = [f"cs-{i}" for i in range(TASKS)]
    with gunicorn(env) as base:
        for i, task_id in enumerate(task_ids):
            body = json.dumps(
                callback(task_id=task_id, user_id=f"owner-{i}", sequence=START_SEQUENCE)
            )
            posted = requests.post(
                f"{base}/callbacks/zego",
                data=body,
                timeout=10,
                headers={"Content-Type": "application/json"},
            )
            assert posted.status_code == 200
            fake.seed(task_id, f"owner-{i}", sequence=START_SEQUENCE, notify=False)
        # The first attempts to arrive fail; the workers must retry them, and only them.
        fake.fail_next(Failure(code=110200151, times=INJECTED_FAILURES))

        with manager_workers(env, WORKERS):
            calls = [t for t in task_ids for _ in range(CALLERS_PER_TASK)]
            barrier = threading.Barrier(len(calls))

            def stop(task_id: str) -> int:
                barrier.wait(timeout=30)
                response = requests.post(
                    f"{base}/api/tasks/{task_id}/stop",
                    headers={"Authorization": f"Bearer {token}"},
                    json={"reason": "concurrency test"},
                    timeout=60,
                )
                return response.status_code

            with ThreadPoolExecutor(len(calls)) as pool:
                statuses = Counter(pool.map(stop, calls))
            assert set(statuses) <= {200, 202}, statuses

            deadline = time.monotonic() + 60
            queued = -1
            while time.monotonic() < deadline and queued != 0:
                time.sleep(0.2)
                db.rollback()
                queued = db.execute(
                    select(func.count())
                    .select_from(StopRequest)
                    .where(StopRequest.state == "queued")
                ).scalar_one()
            assert queued == 0

    per_task = Counter(db.execute(select(StopRequest.task_pk)).scalars())
    assert sorted(per_task.values()) == [1] * TASKS  # one stop request per task, not twenty
    assert set(db.execute(select(StopRequest.state)).scalars()) == {"succeeded"}

    assert {t: len(fake.tasks[t].stops) for t in task_ids} == {t: 1 for t in task_ids}
    sent: dict[str, list[int]] = defaultdict(list)
    for call in sorted(fake.calls, key=lambda c: c["at"]):
        if call["action"] == "StopCloudTranscode":
            sent[call["task_id"]].append(call["sequence"])
    assert sum(len(s) for s in sent.values()) == TASKS + INJECTED_FAILURES
    for task_id in task_ids:
        sequences = sent[task_id]
        assert sequences == sorted(set(sequences)), (task_id, sequences)
        assert min(sequences) > START_SEQUENCE
