"""`POST /api/stops` naming 10,000 tasks, with PostgreSQL a chosen distance away.

    .venv/bin/python bench/stop_batch.py [--tasks 10000] [--db-rtt-ms 25] [--runs 5]

Creates a PostgreSQL database of its own (127.0.0.1:5432, user postgres), runs the
migrations and records N running tasks; then, with the app reaching the database
through a user-space proxy that delays every packet by half the round trip each
way, times each request that queues a stop for all N by name (the stop requests
are deleted between runs). Prints every run's time and the median.

Target (issue 12): answered within 2 s at a 25 ms round trip, for 10,000 tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import make_url, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import bench_database, insert_running_tasks  # noqa: E402  (bench/common.py)

from manager import create_app, dispose_engines  # noqa: E402
from manager.access.tokens import create_token  # noqa: E402
from manager.config import Settings  # noqa: E402
from manager.db import make_engine  # noqa: E402
from manager.migrate import upgrade  # noqa: E402
from tests.delay_proxy import DelayProxy  # noqa: E402

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
APP_ID = 1357924680


def seed(database_url: str, count: int) -> list[str]:
    engine = make_engine(database_url)
    upgrade(engine)
    with engine.begin() as conn:
        insert_running_tasks(
            conn, APP_ID, count, "'transcode-task-' || lpad(g::text, 6, '0') || '-abcdefghij'"
        )
        ids = list(conn.execute(text("SELECT task_id FROM tasks ORDER BY id")).scalars())
    engine.dispose()
    return ids


def time_requests(database_url: str, task_ids: list[str], rtt_ms: float, runs: int) -> list[float]:
    url = make_url(database_url)
    body = json.dumps({"task_ids": task_ids, "reason": "bench"})
    times = []
    with DelayProxy((url.host or "127.0.0.1", url.port or 5432), rtt_ms / 2000) as proxy:
        far = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        settings = replace(
            Settings.from_env({"SECRET_KEY": "bench", "ZEGO_APP_ID": str(APP_ID)}),
            database_url=far,
        )
        app = create_app(settings)
        with app.app_context():
            from manager.services import get_session

            token = create_token(get_session(), "bench")
            get_session().commit()
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(runs):
            started = time.perf_counter()
            response = client.post(
                "/api/stops", data=body, content_type="application/json", headers=headers
            )
            times.append(time.perf_counter() - started)
            answer = response.get_json()
            assert response.status_code == 202, answer
            assert answer["batch"]["total"] == len(task_ids)
            clear(database_url)
        dispose_engines(app)
    return times


def clear(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM stop_requests"))
        conn.execute(text("DELETE FROM stop_batches"))
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--db-rtt-ms", type=float, default=25.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    args = parser.parse_args()
    os.environ.pop("DATABASE_URL", None)
    with bench_database(args.admin_url) as database_url:
        task_ids = seed(database_url, args.tasks)
        times = time_requests(database_url, task_ids, args.db_rtt_ms, args.runs)
    median = statistics.median(times)
    print(f"tasks={args.tasks} db_rtt={args.db_rtt_ms:g} ms runs={args.runs}")
    print("runs (s): " + " ".join(f"{t:.2f}" for t in times))
    print(f"median   {median:.2f} s  target <= 2 s: {'PASS' if median <= 2.0 else 'FAIL'}")
    return 0 if median <= 2.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
