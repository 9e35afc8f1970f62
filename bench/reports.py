"""Time the reports on a large history in PostgreSQL, and the peak memory of a CSV export.

    .venv/bin/python bench/reports.py [--tasks 1000000] [--deliveries 3000000]
                                      [--owners 20000] [--repeat 5] [--keep]

What it does, all on 127.0.0.1 (PostgreSQL with trust auth, see --admin-url):

1. creates a fresh database (dropped at the end, even on error) and migrates it;
2. generates, in SQL with generate_series, --tasks tasks spread over the last 90 days,
   numbered in order of first sight (as the service numbers them), with deliveries in
   order of arrival
   (2 % running, 0.3 % stopping, 5 % failed, the rest stopped; 1 % of runs without a
   start; 10 % of tasks with an earlier second run; run lengths exponential with a mean
   of 30 minutes, 1 % fifty times longer), their runs, --deliveries deliveries of every
   verdict and a stop request for 2 % of the tasks; then VACUUM ANALYZE;
3. times every report through the service functions (all time, the last 30 days, the
   last day): `owners` both as read (the first 100 owners, as JSON and the CLI table
   give them) and whole (every owner, as the CSV export gives them); then three through
   the HTTP endpoint; --repeat times each, and prints the medians;
4. streams a full CSV export of `owners` (all time) and of `stuck` (every running task,
   silent_for=0) through the HTTP endpoint in a subprocess, to /dev/null, and prints its
   peak RSS next to that of the same subprocess exporting nothing.

Targets from the issue: each report under 1 s; the export under 100 MB peak RSS. With
--owners 1000000 (one owner per task, as ZEGOCLOUD's distinct UserId per TaskId makes
it) the whole owners list is a million rows: an export, timed but not held to 1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url, text

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from common import bench_database  # noqa: E402  (bench/common.py)

from manager import dispose_engines, reporting, rollups  # noqa: E402
from manager.db import make_engine, make_session_factory  # noqa: E402
from manager.migrate import upgrade  # noqa: E402

SECONDS_TARGET = 1.0
RSS_TARGET_MB = 100


GENERATE = [
    "SELECT setseed(0.42)",
    # One row per task: its current run's times come from `start` and `len` (seconds).
    """
    CREATE TEMP TABLE gen AS
    SELECT i, start, len,
           CASE WHEN i % 50 = 0 THEN 'running' WHEN i % 300 = 1 THEN 'stopping'
                WHEN i % 20 = 2 THEN 'failed' ELSE 'stopped' END AS status
    FROM (
        -- Numbered in order of start, as the service numbers tasks when first seen.
        SELECT row_number() OVER (ORDER BY start) AS i, start, len
        FROM (
            SELECT :now - interval '90 days' * random() AS start,
                   (-ln(1 - random()) * 1800 * CASE WHEN random() < 0.01 THEN 50 ELSE 1 END)
                       * interval '1 second' AS len
            FROM generate_series(1, :tasks)
        ) AS drawn
    ) AS numbered
    """,
    """
    INSERT INTO tasks (id, app_id, task_id, owner, status, stop_reason, state_seq, state_rank,
                       max_seq, run_floor_seq, runs, started_at, ended_at, first_seen_at,
                       updated_at, last_delivery_at)
    SELECT i, 1, 'task-' || i, 'user-' || (i % :owners), status,
           CASE status WHEN 'failed' THEN 1 WHEN 'stopped' THEN 0 END, 2, 3, 2, 0,
           CASE WHEN i % 10 = 3 THEN 2 ELSE 1 END,
           CASE WHEN i % 100 = 7 AND status IN ('stopped', 'failed') THEN NULL ELSE start END,
           CASE WHEN status IN ('stopped', 'failed') THEN start + len END,
           start - interval '1 day' * (i % 10 = 3)::int,
           CASE WHEN status IN ('stopped', 'failed') THEN start + len
                WHEN status = 'stopping' THEN start + len / 2 ELSE start END,
           CASE WHEN status IN ('stopped', 'failed') THEN start + len ELSE start END
    FROM gen
    """,
    "SELECT setval(pg_get_serial_sequence('tasks', 'id'), :tasks)",
    """
    INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason)
    SELECT id, runs, owner, started_at, ended_at, stop_reason FROM tasks
    """,
    """
    INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason)
    SELECT t.id, 1, t.owner, g.start - interval '1 day', g.start - interval '1 day' + g.len, 0
    FROM tasks t JOIN gen g ON g.i = t.id WHERE t.runs = 2
    """,
    """
    -- Received in order of id, as they are appended when they arrive.
    INSERT INTO deliveries (received_at, verdict, task_pk, event, task_id, body_size, raw_body)
    SELECT :now - interval '90 days' * (1 - (j - random()) / :deliveries), v.verdict,
           CASE WHEN v.verdict <> 'rejected' THEN 1 + j % :tasks END,
           'transcode_start', 'task-' || (1 + j % :tasks), 2, '\\x7b7d'::bytea
    FROM generate_series(1, :deliveries) AS j
    CROSS JOIN LATERAL (
        SELECT CASE WHEN j % 100 < 80 THEN 'applied' WHEN j % 100 < 92 THEN 'duplicate'
                    WHEN j % 100 < 97 THEN 'stale' ELSE 'rejected' END AS verdict
    ) AS v
    """,
    """
    INSERT INTO stop_requests (task_pk, state, user_id, sequence, requested_by, force,
                               created_at, attempts, next_attempt_at)
    SELECT id, CASE WHEN status = 'stopping' THEN 'queued'
                    WHEN id % 7 = 0 THEN 'failed' ELSE 'succeeded' END,
           owner, 3, 'bench', false, updated_at, 1, updated_at
    FROM tasks WHERE status = 'stopping' OR id % 50 = 1
    """,
    "DROP TABLE gen",
]


def generate(engine: Engine, tasks: int, deliveries: int, owners: int, now: datetime) -> None:
    params = {"tasks": tasks, "deliveries": deliveries, "owners": owners, "now": now}
    with engine.begin() as conn:
        for statement in GENERATE:
            conn.execute(text(statement), params)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def row_counts(engine: Engine) -> dict[str, int]:
    tables = ("tasks", "task_runs", "deliveries", "stop_requests")
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}  # noqa: S608


def median_seconds(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times), result


def time_reports(url: str, now: datetime, repeat: int) -> list[tuple[str, float, float, str]]:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    last30 = reporting.Window(now - timedelta(days=30), now)
    last1 = reporting.Window(now - timedelta(days=1), now)

    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
        def call() -> Any:
            with sessions() as session:
                out = fn(session, *args, **kwargs)
                if isinstance(out, reporting.OwnersPage):
                    return len(out.owners)
                return out if isinstance(out, dict) else sum(1 for _ in out)

        return call

    def top(window: reporting.Window | None) -> Callable[[], Any]:
        return run(reporting.owners_page, window, None, now, reporting.OWNERS_LIMIT)

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("summary, all time", run(reporting.summary)),
        ("summary, last 30 days", run(reporting.summary, last30)),
        ("summary, last day", run(reporting.summary, last1)),
        ("summary, one owner", run(reporting.summary, None, "user-7")),
        ("owners, first 100, all time", top(None)),
        ("owners, first 100, last 30 days", top(last30)),
        ("owners, first 100, last day", top(last1)),
        ("owners, every owner, all time", run(reporting.owners, now=now)),
        ("owners, every owner, last 30 days", run(reporting.owners, last30, now=now)),
        ("owners, every owner, last day", run(reporting.owners, last1, now=now)),
        ("daily, last 30 days", run(reporting.daily, now=now)),
        ("daily, 90 days", run(reporting.daily, reporting.Window(now - timedelta(days=90), now))),
        ("daily, one owner", run(reporting.daily, None, "user-7", now=now)),
        ("stuck", run(reporting.stuck, now=now)),
    ]
    # summary and daily write delivery_hours and run_days the first time they need
    # them: timed here, on their own (nothing to do when --reuse finds them written).
    results = []
    for label, table, fill in (
        ("delivery_hours, first fill", "delivery_hours", lambda: rollups.fill(engine, now)),
        (
            "run_days, first fill",
            "run_days",
            lambda: rollups.fill_run_days(engine, now, reporting.final_day_figures),
        ),
    ):
        started = time.perf_counter()
        fill()
        filled = time.perf_counter() - started
        with engine.connect() as conn:
            rows = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()  # noqa: S608
        results.append((label, filled, filled, f"{rows} rows"))
    for label, fn in cases:
        fn()  # warm the cache once
        med, worst, out = median_seconds(fn, repeat)
        shape = f"{out} rows" if isinstance(out, int) else f"{out['tasks']['total']} tasks"
        results.append((label, med, worst, shape))
    engine.dispose()

    # The HTTP endpoint, through the app's test client: JSON for summary and the first
    # page of owners, CSV for every owner.
    app, headers = make_app(url)
    client = app.test_client()
    for label, path in (
        ("HTTP summary (JSON), all time", "/api/reports/summary"),
        ("HTTP owners (JSON), all time", "/api/reports/owners"),
        ("HTTP owners (CSV), all time", "/api/reports/owners?format=csv"),
    ):

        def fetch(path: str = path) -> int:
            response = client.get(path, headers=headers)
            assert response.status_code == 200, response.get_data(as_text=True)
            return len(response.get_data())

        fetch()
        med, worst, size = median_seconds(fetch, repeat)
        results.append((label, med, worst, f"{size} bytes"))
    dispose_engines(app)
    return results


def make_app(url: str) -> tuple[Any, dict[str, str]]:
    from manager import create_app
    from manager.config import Settings
    from manager.tokens import create_token

    app = create_app(Settings(database_url=url, secret_key=secrets.token_hex(16)))
    with app.extensions["manager.sessions"]() as session:
        token = create_token(session, f"bench-{secrets.token_hex(3)}")
        session.commit()
    return app, {"Authorization": f"Bearer {token}"}


def export_child(url: str, path: str) -> None:
    """In a subprocess: stream one export to /dev/null and print rows, bytes, peak RSS."""
    app, headers = make_app(url)
    client = app.test_client()
    rows = size = 0
    response = client.get(path, headers=headers, buffered=False)
    assert response.status_code == 200, response.status_code
    with open(os.devnull, "wb") as sink:
        for chunk in response.response:
            data = chunk if isinstance(chunk, bytes) else chunk.encode()
            sink.write(data)
            size += len(data)
            rows += data.count(b"\n")
    response.close()
    dispose_engines(app)
    print(f"{max(rows - 1, 0)} {size} {peak_rss_kb()}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: the machine may be busy with more than this."""
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


def peak_rss_kb() -> int:
    """This process's own peak RSS. Not ru_maxrss: Linux carries the parent's peak over
    fork and exec into it, so a child of the (large) timing process would report that."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_export(url: str, path: str) -> tuple[int, int, float, float]:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--export-child", url, path],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    rows, size, peak_kb = (int(v) for v in out.stdout.split()[-3:])
    return rows, size, peak_kb / 1024, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--deliveries", type=int, default=3_000_000)
    parser.add_argument("--owners", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", metavar="NAME", help="time a database kept by --keep")
    parser.add_argument("--export-child", nargs=2, metavar=("URL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_child:
        export_child(*args.export_child)
        return

    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    with contextlib.ExitStack() as stack:
        if args.reuse:
            url = make_url(args.admin_url).set(drivername="postgresql+psycopg", database=args.reuse)
            url = url.render_as_string(hide_password=False)
        else:
            url = stack.enter_context(
                bench_database(args.admin_url, args.keep, prefix="manager_bench_reports")
            )
        engine = make_engine(url)
        upgrade(engine)
        if not args.reuse:
            started = time.perf_counter()
            generate(engine, args.tasks, args.deliveries, args.owners, now)
            print(f"generated in {time.perf_counter() - started:.1f} s: {row_counts(engine)}")
        else:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE"))
            print(f"reusing {args.reuse}: {row_counts(engine)}")
        engine.dispose()

        print(f"\n{'report':34} {'median':>9} {'worst':>9}  result")
        print(f"load average before: {load_average()}")
        for label, med, worst, shape in time_reports(url, now, args.repeat):
            # The fill is a one-off on first use, not a report; every owner is an export.
            over = med >= SECONDS_TARGET and not any(
                part in label for part in ("first fill", "every owner", "(CSV)")
            )
            flag = "  ** over 1 s" if over else ""
            print(f"{label:34} {med * 1000:7.0f} ms {worst * 1000:6.0f} ms  {shape}{flag}")

        header = f"{'rows':>9} {'MB sent':>8} {'peak RSS':>9} {'time':>7}"
        print(f"\n{'CSV export (subprocess)':34} {header}")
        for label, path in (
            ("nothing (baseline)", "/api/reports/owners?format=csv&owner=nobody"),
            ("owners, all time", "/api/reports/owners?format=csv"),
            ("stuck, silent_for=0", "/api/reports/stuck?format=csv&silent_for=0"),
        ):
            rows, size, peak_mb, elapsed = measure_export(url, path)
            flag = "" if peak_mb < RSS_TARGET_MB else "  ** over 100 MB"
            print(
                f"{label:34} {rows:9d} {size / 1e6:8.1f} {peak_mb:6.1f} MB {elapsed:6.1f} s{flag}"
            )
        print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
