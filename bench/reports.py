"""Time the reports on a large history in PostgreSQL, and the peak memory of a CSV export.

    .venv/bin/python bench/reports.py [--tasks 1000000] [--deliveries 3000000]
                                      [--owners 20000] [--repeat 5] [--keep]
    .venv/bin/python bench/reports.py --tasks 20000 --generate-only   # history + checks

What it does, all on 127.0.0.1 (PostgreSQL with trust auth, see --admin-url):

1. creates a fresh database (dropped at the end, even on error) and migrates it;
2. generates, in SQL with generate_series (`generate`, which bench/rebuild.py and
   bench/callbacks.py use too), --tasks tasks spread over the last 90 days, numbered in
   order of first sight (as the service numbers them)
   (2 % running, 0.3 % stopping, 5 % failed, the rest stopped; 1 % of runs without a
   start; 10 % of tasks with an earlier second run; run lengths exponential with a mean
   of 30 minutes, 1 % fifty times longer), their runs, and --deliveries deliveries (by
   default 3 per task) in order of arrival, which are the runs' own events: per run a
   TranscodeStarted (none for a run without a start, whose first event is its stop),
   TranscodeUpdated ones (a few per run on average, 1,000 for 2 tasks in 10,000) and a
   transcode_stop (StopReason 1 for a failed task, 0 otherwise; none for a run still
   going), Sequences rising across a task's runs, Timestamps the runs' times; about 80 %
   of the deliveries `applied` and 5 % `stale` (updates that arrived after their run's
   stop), the rest resends (12 %, `duplicate`) and `rejected` requests (3 %). Stop
   requests: accepted ones for every stopping task and for 2 % of the others (refused
   for a seventh of those), queued ones for 0.3 % of the running tasks. Every task and
   run is what the service's rules make of its events (so a task whose only event is a
   stop has no owner), and each event holds the event key the service would give it;
   `check_history` checks it (by SQL, and by folding a sample of tasks with
   manager/callbacks/rules.py), unless --check-sample 0. Raw bodies are `{}` and no
   Details are generated (input and outputs stay empty). The rows are bulk-loaded:
   indexes built after them, foreign keys not checked row by row where the role may
   (a superuser). Then VACUUM ANALYZE;
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
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, inspect, make_url, text
from sqlalchemy.exc import DBAPIError

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from common import bench_database  # noqa: E402  (bench/common.py)

from manager import dispose_engines  # noqa: E402
from manager.db import make_engine, make_session_factory  # noqa: E402
from manager.migrate import upgrade  # noqa: E402
from manager.reports import reporting, rollups  # noqa: E402
from manager.zego.callbacks import Callback  # noqa: E402

SECONDS_TARGET = 1.0
RSS_TARGET_MB = 100
# The owner the one-owner reports are timed for. Not user-7: with --owners 20000, its
# tasks are those numbered 7 modulo 100, whose only event is a stop, so they have no
# owner at all; user-3's are tasks with two runs each.
ONE_OWNER = "user-3"


# Task i (numbered in order of its current run's start, as drawn) is running, stopping,
# failed or stopped by its number, as before: 2 % running, 0.3 % stopping, 5 % failed.
_STATUS = """CASE WHEN i % 50 = 0 THEN 'running' WHEN i % 300 = 1 THEN 'stopping'
                WHEN i % 20 = 2 THEN 'failed' ELSE 'stopped' END"""
# Shares of --deliveries, as before: 80 % applied, 12 % duplicate, 5 % stale, 3 % rejected.
# Applied and stale deliveries are the runs' events (a stale one: an update that arrived
# after its run's stop); the starts and stops every run needs come first, updates make up
# the rest of the 85 %, duplicates and rejected ones whatever is left.
EVENT_SHARE = 0.85
STALE_SHARE = 0.05
DUPLICATE_OF_REST = 0.8  # 12 % : 3 %
HEAVY_UPDATES = 1000  # updates of the current run of 2 tasks in 10,000 (one running)

GENERATE_TASKS = [
    "SET LOCAL work_mem = '256MB'",
    "SELECT setseed(0.42)",
    # One row per task. The draws are the old generator's (same seed, same order); times
    # are whole seconds, as ZEGOCLOUD's Timestamps are, and a run that has ended ended in
    # the past (the few drawn to end in the future start one length earlier instead).
    f"""
    CREATE TEMP TABLE gen ON COMMIT DROP AS
    SELECT i, status, runs, nostart, req, len,
           CASE WHEN status <> 'running' AND start + len > :now - interval '2 minutes'
                THEN start - len - interval '2 minutes' ELSE start END AS start
    FROM (
        SELECT i, status,
               CASE WHEN i % 10 = 3 THEN 2 ELSE 1 END AS runs,
               i % 100 = 7 AND status IN ('stopped', 'failed') AS nostart,
               -- Stop requests: accepted for every stopping task and for 2 % of the others
               -- (refused for good for a seventh of those), queued for 0.3 % of the
               -- running tasks.
               CASE WHEN i % 300 = 1 THEN 'succeeded' WHEN i % 300 = 0 THEN 'queued'
                    WHEN i % 50 = 1 THEN CASE WHEN i % 7 = 0 THEN 'failed' ELSE 'succeeded' END
               END AS req,
               date_trunc('second', start) AS start,
               greatest(round(extract(epoch FROM len)), 1) * interval '1 second' AS len
        FROM (
            SELECT i, start, len, {_STATUS} AS status
            FROM (
                SELECT row_number() OVER (ORDER BY start) AS i, start, len
                FROM (
                    SELECT :now - interval '90 days' * random() AS start,
                           (-ln(1 - random()) * 1800
                               * CASE WHEN random() < 0.01 THEN 50 ELSE 1 END)
                               * interval '1 second' AS len
                    FROM generate_series(1, :tasks)
                ) AS drawn
            ) AS numbered
        ) AS with_status
    ) AS whole_seconds
    """,  # noqa: S608 - a constant snippet, values bound
]
# Runs with a start, starts + stops they need, runs with a start that ended, heavy tasks
# (and those of them that ended).
COUNT_RUNS = """
    SELECT count(*) FILTER (WHERE NOT nostart) + count(*) FILTER (WHERE runs = 2),
           count(*) FILTER (WHERE NOT nostart) + 2 * count(*) FILTER (WHERE runs = 2)
               + count(*) FILTER (WHERE status IN ('stopped', 'failed')),
           count(*) FILTER (WHERE status IN ('stopped', 'failed') AND NOT nostart)
               + count(*) FILTER (WHERE runs = 2),
           count(*) FILTER (WHERE i % 10000 IN (50, 55) AND NOT nostart),
           count(*) FILTER (WHERE i % 10000 IN (50, 55) AND NOT nostart
                            AND status IN ('stopped', 'failed'))
    FROM gen
"""
# Updates per run: geometric with mean m = q / (1 - q), and HEAVY_UPDATES for the heavy.
_UPDATES = "CASE WHEN :q > 0 THEN floor(ln(1 - random()) / ln(:q))::int ELSE 0 END"
GENERATE_EVENTS = [
    # Each task's Sequences: its earlier run (if any) from 1, start, updates, stop; then
    # its current run: start, updates, our stop request (if any), ZEGOCLOUD's stop.
    f"""
    CREATE TEMP TABLE gt ON COMMIT DROP AS
    SELECT *,
           greatest(last2, p, e2) AS max_seq,
           -- The end of the span the current run's updates are spread over.
           CASE WHEN status IN ('stopped', 'failed') THEN greatest(start, t1 - interval '1 second')
                WHEN status = 'stopping' THEN treq - interval '1 second'
                ELSE greatest(start, least(start + len, :now - interval '10 seconds'))
           END AS tl
    FROM (
        SELECT *,
               CASE WHEN req IS NOT NULL THEN last2 + 1 END AS p,
               CASE WHEN status IN ('stopped', 'failed') THEN
                   CASE WHEN nostart THEN s2 ELSE last2 + 1 + (req IS NOT NULL)::int END
               END AS e2,
               -- When ZEGOCLOUD accepted (or refused) our stop: halfway through a stopping
               -- task's run, at the end of an ended one, after the last update of a
               -- running one (queued: not accepted yet).
               CASE WHEN status = 'stopping'
                        THEN date_trunc('second', start + len / 2) + interval '1 second'
                    WHEN status = 'running'
                        THEN greatest(start, least(start + len, :now - interval '10 seconds'))
                             + interval '1 second'
                    ELSE t1 END AS treq
        FROM (
            SELECT *,
                   CASE WHEN runs = 2 THEN 3 + u1 ELSE 1 END AS s2,
                   CASE WHEN nostart THEN 0 WHEN runs = 2 THEN 3 + u1 + u2 ELSE 1 + u2 END
                       AS last2,
                   CASE WHEN NOT nostart THEN start END AS t0,
                   CASE WHEN status IN ('stopped', 'failed') THEN start + len END AS t1,
                   CASE status WHEN 'failed' THEN 1 WHEN 'stopped' THEN 0 END AS reason
            FROM (
                SELECT gen.*,
                       CASE WHEN runs = 2 THEN {_UPDATES} ELSE 0 END AS u1,
                       CASE WHEN nostart THEN 0
                            WHEN i % 10000 IN (50, 55) AND :heavy > 0 THEN :heavy
                            ELSE {_UPDATES} END AS u2
                FROM gen
            ) AS drawn
        ) AS current_run
    ) AS sequences
    """,  # noqa: S608 - constant snippets, values bound
    # One row per run: an earlier one a day before, stopped before the current one began.
    """
    CREATE TEMP TABLE gr ON COMMIT DROP AS
    SELECT t.i, r.*
    FROM gt AS t CROSS JOIN LATERAL (
        SELECT 1 AS run_no, e.t0, e.t1, greatest(e.t0, e.t1 - interval '1 second') AS tl,
               0 AS reason, t.u1 AS nupd, 1 AS seq0, 2 + t.u1 AS stop_seq
        FROM (SELECT t.start - interval '1 day' AS t0,
                     t.start - interval '1 day' + least(t.len, interval '23 hours') AS t1) AS e
        WHERE t.runs = 2
        UNION ALL
        SELECT t.runs, t.t0, t.t1, t.tl, t.reason, t.u2, t.s2, t.e2
    ) AS r
    """,
    # The runs' events, numbered: kind 0 TranscodeStarted, 1 TranscodeUpdated (spread
    # evenly over the run), 2 transcode_stop. Each is received 0.1 s after its Timestamp
    # (in Sequence order within a second), except the late updates: after their run's
    # stop, hence stale.
    """
    CREATE TEMP TABLE ev ON COMMIT DROP AS
    SELECT row_number() OVER () AS n, i, kind, seq, ts, stop_reason,
           CASE WHEN late THEN t1 + interval '0.5 seconds' + random() * interval '60 seconds'
                ELSE ts + interval '100 milliseconds' + seq * interval '100 microseconds'
           END AS received_at,
           CASE WHEN late THEN 'stale' ELSE 'applied' END AS verdict
    FROM (
        SELECT r.i, r.t1,
               CASE WHEN k = 0 THEN 0 WHEN k <= r.nupd THEN 1 ELSE 2 END AS kind,
               CASE WHEN k <= r.nupd THEN r.seq0 + k ELSE r.stop_seq END AS seq,
               CASE WHEN k = 0 THEN r.t0
                    WHEN k <= r.nupd
                        THEN r.t0 + date_trunc('second', (r.tl - r.t0) * (k::float8 / (r.nupd + 1)))
                    ELSE r.t1 END AS ts,
               CASE WHEN k > r.nupd THEN r.reason END AS stop_reason,
               k BETWEEN 1 AND r.nupd AND r.t1 IS NOT NULL AND random() < :stale_p AS late
        FROM gr AS r CROSS JOIN LATERAL generate_series(
            CASE WHEN r.t0 IS NULL THEN r.nupd + 1 ELSE 0 END,
            CASE WHEN r.t1 IS NULL THEN r.nupd ELSE r.nupd + 1 END
        ) AS k
    ) AS e
    """,
    # Tasks numbered in order of first sight, as the service numbers them.
    """
    CREATE TEMP TABLE agg ON COMMIT DROP AS
    SELECT i, row_number() OVER (ORDER BY min(received_at), i) AS id,
           min(received_at) AS first_seen,
           max(received_at) FILTER (WHERE verdict = 'applied') AS last_applied,
           max(received_at) AS last_received
    FROM ev GROUP BY i
    """,
]
# Each column of a generated task, as the service's rules would leave it after the
# task's events (aliases: t its numbers, a its events' aggregates, d its resends').
# Columns of the schema before migration 0013 are here too; only those the table has
# are written (see task_insert).
TASK_VALUES = {
    "id": "a.id",
    "app_id": ":app_id",
    "task_id": "'task-' || a.id",
    # The owner is the UserId of the task's starts and updates: none, none known.
    "owner": "CASE WHEN NOT t.nostart THEN 'user-' || (t.i % :owners) END",
    "status": "t.status",
    "stop_reason": "t.reason",
    # The highest position among its events, Started 2, Updated 4, stop request 5, stop 6.
    "state_seq": "CASE t.status WHEN 'running' THEN t.last2 WHEN 'stopping' THEN t.p ELSE t.e2 END",
    "state_rank": """CASE t.status WHEN 'running' THEN CASE WHEN t.u2 = 0 THEN 2 ELSE 4 END
                                   WHEN 'stopping' THEN 5 ELSE 6 END""",
    "max_seq": "t.max_seq",
    "owner_seq": "CASE WHEN NOT t.nostart THEN t.last2 END",
    "owner_rank": "CASE WHEN NOT t.nostart THEN CASE WHEN t.u2 = 0 THEN 2 ELSE 4 END END",
    "runs": "t.runs",
    "last_failure_at": "CASE WHEN t.status = 'failed' THEN t.t1 END",
    "run_start_seen": "NOT t.nostart",
    "run_floor_seq": "CASE WHEN t.runs = 2 THEN 2 + t.u1 ELSE -1 END",
    "run_start_seq": "CASE WHEN NOT t.nostart THEN t.s2 END",
    "run_start_rank": "CASE WHEN NOT t.nostart THEN 2 END",
    "end_seq": "t.e2",
    "started_at": "t.t0",
    "ended_at": "t.t1",
    "first_seen_at": "a.first_seen",
    "updated_at": "CASE WHEN t.status = 'stopping' THEN t.treq ELSE a.last_applied END",
    "last_delivery_at": "greatest(a.last_received, d.last_dup)",
}
TASKS_INSERT = """
    INSERT INTO tasks ({columns})
    SELECT {values}
    FROM gt AS t
    JOIN agg AS a USING (i)
    LEFT JOIN (SELECT i, max(received_at) AS last_dup FROM dup GROUP BY i) AS d USING (i)
"""


def task_insert(conn: Any) -> str:
    """TASKS_INSERT for the columns the tasks table has; an error if one it must fill is
    not in TASK_VALUES (a new NOT NULL column without a default)."""
    columns = inspect(conn).get_columns("tasks")
    unknown = [
        c["name"]
        for c in columns
        if c["name"] not in TASK_VALUES and not c["nullable"] and c.get("default") is None
    ]
    if unknown:
        raise RuntimeError(f"bench/reports.py does not know how to fill tasks.{unknown}")
    names = [c["name"] for c in columns if c["name"] in TASK_VALUES]
    return TASKS_INSERT.format(
        columns=", ".join(names), values=",\n           ".join(TASK_VALUES[n] for n in names)
    )


GENERATE_ROWS = [
    # Resends of events, received 2 to 62 s after them (ZEGOCLOUD's retries): the same
    # (Timestamp, Nonce) and body, or a new Timestamp and Nonce.
    """
    CREATE TEMP TABLE dup ON COMMIT DROP AS
    SELECT e.i, e.kind, e.seq, e.stop_reason, d.reason,
           e.ts + CASE WHEN d.reason = 'same_event'
                       THEN date_trunc('second', d.delay) ELSE interval '0' END AS ts,
           least(:now, e.received_at + d.delay) AS received_at
    FROM (
        SELECT 1 + floor(random() * :events)::bigint AS n,
               (ARRAY[2, 6, 14, 30, 62])[1 + floor(random() * 5)::int] * interval '1 second'
                   + random() * interval '1 second' AS delay,
               CASE WHEN random() < 0.3 THEN 'same_nonce' ELSE 'same_event' END AS reason
        FROM generate_series(1, :duplicates)
    ) AS d
    JOIN ev AS e USING (n)
    """,
    TASKS_INSERT,  # see task_insert()
    "SELECT setval(pg_get_serial_sequence('tasks', 'id'), greatest(:tasks, 1))",
    """
    INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason)
    SELECT a.id, r.run_no, CASE WHEN r.t0 IS NOT NULL THEN 'user-' || (r.i % :owners) END,
           r.t0, r.t1, r.reason
    FROM gr AS r JOIN agg AS a USING (i)
    """,
    # Every delivery, appended in order of arrival: the events (each holding its event
    # key, as the service computes it), their resends, and rejected requests.
    """
    INSERT INTO deliveries (received_at, verdict, reason, event_key, task_pk, app_id, event,
                            task_id, user_id, sequence, status, stop_reason, zego_timestamp,
                            nonce, body_size, raw_body)
    SELECT received_at, verdict, reason,
           CASE WHEN keyed THEN encode(sha256(convert_to(
               '[' || :app_id || ', "' || event || '", "' || task_id || '", ' || sequence
               || ', "' || status || '", ' || coalesce(stop_reason::text, 'null') || ']',
               'UTF8')), 'hex') END,
           task_pk, :app_id, event, task_id, user_id, sequence, status, stop_reason,
           zego_timestamp,
           substr(md5(task_id || '/' || sequence || '/' || status || nonce_salt), 1, 16),
           2, '\\x7b7d'::bytea
    FROM (
        SELECT x.received_at, x.verdict, x.reason, x.keyed, a.id AS task_pk,
               CASE WHEN x.kind = 2 THEN 'transcode_stop' ELSE 'transcode_start' END AS event,
               'task-' || a.id AS task_id, 'user-' || (x.i % :owners) AS user_id,
               x.seq AS sequence,
               (ARRAY['TranscodeStarted', 'TranscodeUpdated', 'TranscodeStopped'])[x.kind + 1]
                   AS status,
               x.stop_reason, extract(epoch FROM x.ts)::bigint AS zego_timestamp,
               x.nonce_salt
        FROM (
            SELECT i, kind, seq, ts, stop_reason, received_at, verdict,
                   CASE WHEN verdict = 'stale' THEN 'older_than_state' END AS reason,
                   true AS keyed, '' AS nonce_salt
            FROM ev
            UNION ALL
            SELECT i, kind, seq, ts, stop_reason, received_at, 'duplicate', reason, false,
                   CASE WHEN reason = 'same_event' THEN '/' || received_at ELSE '' END
            FROM dup
        ) AS x
        JOIN agg AS a USING (i)
        UNION ALL
        SELECT :now - interval '90 days' * random(), 'rejected',
               (ARRAY['invalid_signature', 'invalid_signature', 'stale_timestamp',
                      'stale_timestamp', 'wrong_appid', 'invalid_json'])
                   [1 + floor(random() * 6)::int],
               false, NULL, 'transcode_start', 'task-' || (1 + j % :tasks), NULL, NULL, NULL,
               NULL, NULL, '/' || j
        FROM generate_series(1, :rejected) AS j
        ORDER BY received_at
    ) AS arrived
    """,
    # Stop requests, each with its one attempt: accepted ones are events of their task.
    """
    WITH requests AS (
        INSERT INTO stop_requests (task_pk, state, user_id, sequence, requested_by, force,
                                   created_at, attempts, next_attempt_at, last_code,
                                   last_message, last_request_id, completed_at)
        SELECT a.id, t.req, 'user-' || (t.i % :owners), t.p, 'bench', false, t.treq, 1,
               t.treq + CASE WHEN t.req = 'queued' THEN interval '2 seconds' ELSE '0' END,
               CASE t.req WHEN 'succeeded' THEN 0 WHEN 'failed' THEN 110200160
                          ELSE 110200151 END,
               CASE t.req WHEN 'succeeded' THEN 'success' WHEN 'failed' THEN 'refused'
                          ELSE 'transcoding task failed, retry' END,
               'bench-' || a.id, CASE WHEN t.req <> 'queued' THEN t.treq END
        FROM gt AS t JOIN agg AS a USING (i)
        WHERE t.req IS NOT NULL
        RETURNING id, state, sequence, created_at, last_code, last_message, last_request_id
    )
    INSERT INTO stop_attempts (stop_request_id, attempted_at, sequence, outcome, http_status,
                               code, message, request_id, elapsed_ms, worker)
    SELECT id, created_at, sequence,
           CASE state WHEN 'succeeded' THEN 'success' WHEN 'failed' THEN 'permanent'
                      ELSE 'retryable' END,
           200, last_code, last_message, last_request_id, 40, 'bench'
    FROM requests
    """,
]


def bulk_load(conn: Any, tables: tuple[str, ...]) -> list[str]:
    """Ready `tables` for a bulk load in this transaction: their indexes other than the
    primary key dropped (built again, by sorting, far faster than row by row), and, where
    the role may (a superuser), foreign keys not checked row by row (the generated rows
    are consistent by construction; check_history checks). Returns the statements that
    build the indexes again, to run once the rows are in."""
    recreate = []
    for table in tables:
        constraints = conn.execute(
            text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = CAST(:t AS regclass) AND contype = 'u'"
            ),
            {"t": table},
        ).all()
        indexes = conn.execute(
            text(
                """SELECT CAST(i.indexrelid AS regclass)::text, pg_get_indexdef(i.indexrelid)
                   FROM pg_index AS i
                   WHERE i.indrelid = CAST(:t AS regclass) AND NOT i.indisprimary
                       AND NOT EXISTS (SELECT FROM pg_constraint AS c
                                       WHERE c.conindid = i.indexrelid)"""
            ),
            {"t": table},
        ).all()
        for name, definition in constraints:
            conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
            recreate.append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        for name, definition in indexes:
            conn.execute(text(f"DROP INDEX {name}"))
            recreate.append(definition)
    conn.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
    with contextlib.suppress(DBAPIError), conn.begin_nested():
        conn.execute(text("SET LOCAL session_replication_role = replica"))
    return recreate


def generate(
    engine: Engine,
    tasks: int,
    deliveries: int,
    owners: int,
    now: datetime,
    app_id: int = 1,
    verbose: bool = False,
) -> dict[str, int]:
    """Write the synthetic history (one transaction), then VACUUM ANALYZE. Returns how
    many deliveries of each kind it wrote; `verbose` prints each statement's time."""
    params: dict[str, Any] = {
        "tasks": tasks,
        "deliveries": deliveries,
        "owners": owners,
        "now": now,
        "app_id": app_id,
    }

    def run(conn: Any, statement: str) -> Any:
        started = time.perf_counter()
        result = conn.execute(text(statement), params)
        if verbose:
            words = " ".join(line.strip() for line in statement.strip().splitlines()[:2])
            print(f"    {time.perf_counter() - started:6.1f} s  {words[:70]}", flush=True)
        return result

    with engine.begin() as conn:
        recreate = bulk_load(conn, ("tasks", "task_runs", "deliveries"))
        for statement in GENERATE_TASKS:
            run(conn, statement)
        started_runs, needed, ended_runs, heavy, heavy_ended = run(conn, COUNT_RUNS).one()
        budget = EVENT_SHARE * deliveries - needed
        params["heavy"] = HEAVY_UPDATES if budget >= HEAVY_UPDATES * heavy else 0
        updates = max(0.0, budget - params["heavy"] * heavy)
        mean = updates / started_runs if started_runs else 0.0
        params["q"] = mean / (1 + mean)
        # Late updates: those of ended runs, STALE_SHARE of --deliveries if there are enough.
        ended_updates = (updates * ended_runs / started_runs if started_runs else 0) + (
            params["heavy"] * heavy_ended
        )
        params["stale_p"] = (
            min(1.0, STALE_SHARE * deliveries / ended_updates) if ended_updates else 0
        )
        for statement in GENERATE_EVENTS:
            run(conn, statement)
        events = run(conn, "SELECT count(*) FROM ev").scalar_one()
        rest = max(0, deliveries - events)
        params["events"] = events
        params["duplicates"] = round(rest * DUPLICATE_OF_REST)
        params["rejected"] = rest - params["duplicates"]
        for statement in GENERATE_ROWS:
            run(conn, task_insert(conn) if statement is TASKS_INSERT else statement)
        for statement in recreate:
            run(conn, statement)
    started = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    if verbose:
        print(f"    {time.perf_counter() - started:6.1f} s  VACUUM ANALYZE")
    return {
        "events": events,
        "duplicates": params["duplicates"],
        "rejected": params["rejected"],
    }


# Checks that the history's events and its tasks and runs agree: (label, found, expected).
CHECKS = [
    (
        "runs = TranscodeStarted events + runs without a start",
        """SELECT (SELECT count(*) FROM task_runs),
                  (SELECT count(*) FROM deliveries
                   WHERE event_key IS NOT NULL AND status = 'TranscodeStarted')
                  + (SELECT count(*) FROM task_runs WHERE started_at IS NULL)""",
    ),
    (
        "runs without a start = tasks whose first event is a stop",
        """SELECT (SELECT count(*) FROM task_runs WHERE started_at IS NULL),
                  (SELECT count(*) FROM (
                       SELECT DISTINCT ON (task_pk) event FROM deliveries
                       WHERE event_key IS NOT NULL ORDER BY task_pk, sequence, id
                   ) AS first WHERE event = 'transcode_stop')""",
    ),
    (
        "ended runs = transcode_stop events",
        """SELECT (SELECT count(*) FROM task_runs WHERE ended_at IS NOT NULL),
                  (SELECT count(*) FROM deliveries
                   WHERE event_key IS NOT NULL AND event = 'transcode_stop')""",
    ),
    (
        "tasks.runs summed = task_runs rows",
        "SELECT (SELECT sum(runs) FROM tasks), (SELECT count(*) FROM task_runs)",
    ),
    (
        "tasks whose max_seq is not their highest Sequence (events, stop requests)",
        """SELECT count(*), 0 FROM tasks AS t
           LEFT JOIN (SELECT task_pk, max(sequence) AS s FROM deliveries
                      WHERE event_key IS NOT NULL GROUP BY task_pk) AS e ON e.task_pk = t.id
           LEFT JOIN (SELECT task_pk, max(sequence) AS s FROM stop_requests
                      GROUP BY task_pk) AS r ON r.task_pk = t.id
           WHERE t.max_seq IS DISTINCT FROM greatest(e.s, r.s)""",
    ),
    (
        "earlier runs whose events are not all below the next run's",
        """SELECT count(*), 0 FROM task_runs AS r1
           JOIN task_runs AS r2 ON r2.task_pk = r1.task_pk AND r2.run_no = r1.run_no + 1
           WHERE NOT (
               SELECT max(sequence) FROM deliveries AS d
               WHERE d.task_pk = r1.task_pk AND d.event_key IS NOT NULL
                   AND d.zego_timestamp <= extract(epoch FROM r1.ended_at)
           ) < (
               SELECT min(sequence) FROM deliveries AS d
               WHERE d.task_pk = r1.task_pk AND d.event_key IS NOT NULL
                   AND d.zego_timestamp >= extract(epoch FROM r2.started_at)
           )""",
    ),
    (
        "stopping tasks without an accepted stop above their events",
        """SELECT count(*), 0 FROM tasks AS t
           WHERE t.status = 'stopping' AND NOT EXISTS (
               SELECT FROM stop_requests AS r
               JOIN stop_attempts AS a ON a.stop_request_id = r.id
               WHERE r.task_pk = t.id AND r.state = 'succeeded' AND a.outcome = 'success'
                   AND a.sequence > (SELECT max(sequence) FROM deliveries AS d
                                     WHERE d.task_pk = t.id AND d.event_key IS NOT NULL))""",
    ),
    (
        "event keys that are not unique or not 64 characters",
        """SELECT count(*) - count(DISTINCT event_key)
                  + count(*) FILTER (WHERE length(event_key) <> 64), 0
           FROM deliveries WHERE event_key IS NOT NULL""",
    ),
]
# The tasks replayed: a random sample, and a few of every kind.
_SAMPLE = """
    (SELECT id FROM tasks ORDER BY random() LIMIT :n)
    UNION (SELECT id FROM tasks WHERE runs = 2 ORDER BY id LIMIT 20)
    UNION (SELECT id FROM tasks WHERE started_at IS NULL ORDER BY id LIMIT 20)
    UNION (SELECT id FROM tasks WHERE status IN ('running', 'stopping', 'failed')
           ORDER BY id % 7, id LIMIT 60)
    UNION (SELECT task_pk FROM stop_requests ORDER BY id LIMIT 20)
    UNION (SELECT task_pk FROM deliveries WHERE verdict = 'stale' ORDER BY id LIMIT 20)
    UNION (SELECT id FROM tasks ORDER BY max_seq DESC LIMIT 5)
"""


def check_history(engine: Engine, sample: int = 500) -> bool:
    """Print the checks above, then fold `sample` tasks (and some of every kind) from
    their events with the service's rules (manager/callbacks/rules.py) and compare the
    result with their rows in tasks and task_runs. True when all agree."""
    ok = True
    with engine.connect() as conn:
        for label, query in CHECKS:
            found, expected = conn.execute(text(query)).one()
            agree = found == expected
            ok &= agree
            print(f"  check: {label}: {found} / {expected}{'' if agree else '  ** DISAGREE'}")
        ids = sorted(conn.execute(text(_SAMPLE), {"n": sample}).scalars())
        differ = [d for task_pk in ids if (d := _fold_differs(conn, task_pk))]
    print(
        f"  folded {len(ids)} tasks from their events with the service's rules: "
        f"{len(ids) - len(differ)} agree with their task and runs"
    )
    for line in differ[:10]:
        print(f"    ** {line}")
    return ok and not differ


def _fold_differs(conn: Any, task_pk: int) -> str | None:
    """The task folded from its events, against its rows; None if they agree."""
    from manager.callbacks.history import accepted_stop_event, delivery_event
    from manager.callbacks.rules import fold

    row = conn.execute(text("SELECT * FROM tasks WHERE id = :id"), {"id": task_pk}).mappings().one()
    deliveries = conn.execute(
        text("SELECT * FROM deliveries WHERE task_pk = :id ORDER BY id"), {"id": task_pk}
    ).all()
    events = [d for d in deliveries if d.event_key is not None]
    requests = conn.execute(
        text(
            """SELECT r.sequence, a.outcome, a.sequence AS attempt_sequence, a.attempted_at
               FROM stop_requests AS r JOIN stop_attempts AS a ON a.stop_request_id = r.id
               WHERE r.task_pk = :id"""
        ),
        {"id": task_pk},
    ).all()
    runs = conn.execute(
        text(
            "SELECT owner, started_at, ended_at, stop_reason FROM task_runs "
            "WHERE task_pk = :id ORDER BY run_no"
        ),
        {"id": task_pk},
    ).all()
    for d in events:
        if _event_key(d) != d.event_key:
            return f"task {task_pk}: delivery {d.id} does not hold the service's event key"

    h = fold(
        [delivery_event(d) for d in events]
        + [
            accepted_stop_event(
                SimpleNamespace(sequence=r.attempt_sequence, attempted_at=r.attempted_at)
            )
            for r in requests
            if r.outcome == "success"
        ]
    )
    last = h.last_run
    expected: dict[str, Any] = {
        "status": str(h.status),
        "state_seq": h.position[0],
        "state_rank": h.position[1],
        "owner": h.owner,
        "owner_seq": None if h.owner_position is None else h.owner_position[0],
        "owner_rank": None if h.owner_position is None else h.owner_position[1],
        "last_failure_at": h.last_failure_at,
        "runs": h.run_count,
        "run_start_seen": last is not None and last.start_seen,
        "started_at": None if last is None else last.started_at,
        "ended_at": None if last is None else last.ended_at,
        "stop_reason": None if last is None else last.stop_reason,
        # Outside the fold: the highest Sequence seen or sent, first and last arrival.
        "max_seq": max([d.sequence for d in events] + [r.sequence for r in requests]),
        "first_seen_at": min(d.received_at for d in deliveries),
        "last_delivery_at": max(d.received_at for d in deliveries),
    }
    wrong = [
        f"{name} {row[name]!r} != {value!r}"
        for name, value in expected.items()
        if name in row and row[name] != value
    ]
    folded = [(h.owner, r.started_at, r.ended_at, r.stop_reason) for r in h.runs]
    if [tuple(r) for r in runs] != folded:
        wrong.append(f"runs {[tuple(r) for r in runs]} != folded {folded}")
    return f"task {task_pk} ({row['task_id']}): " + "; ".join(wrong) if wrong else None


def _event_key(d: Any) -> str:
    """The event key the service gives this delivery's callback."""
    return Callback(
        event=d.event, app_id=d.app_id, timestamp=d.zego_timestamp,
        timestamp_text=str(d.zego_timestamp), nonce=d.nonce or "", signature="",
        task_id=d.task_id, user_id=d.user_id, sequence=d.sequence, sequence_given=True,
        status=d.status, stop_reason=d.stop_reason, input=None, outputs=None, payload={},
    ).event_key()  # fmt: skip


def describe_deliveries(engine: Engine, kinds: dict[str, int]) -> str:
    """The generated deliveries by verdict, and the events among them by status."""
    with engine.connect() as conn:
        verdicts = dict(
            conn.execute(text("SELECT verdict, count(*) FROM deliveries GROUP BY verdict")).all()
        )
        statuses = dict(
            conn.execute(
                text(
                    "SELECT status, count(*) FROM deliveries WHERE event_key IS NOT NULL "
                    "GROUP BY status"
                )
            ).all()
        )
        heaviest = conn.execute(text("SELECT max(max_seq) FROM tasks")).scalar_one()
    return (
        f"{kinds['events']} events {statuses}, {kinds['duplicates']} resends, "
        f"{kinds['rejected']} rejected; by verdict {verdicts}; highest Sequence {heaviest}"
    )


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
        ("summary, one owner", run(reporting.summary, None, ONE_OWNER)),
        ("owners, first 100, all time", top(None)),
        ("owners, first 100, last 30 days", top(last30)),
        ("owners, first 100, last day", top(last1)),
        ("owners, every owner, all time", run(reporting.owners, now=now)),
        ("owners, every owner, last 30 days", run(reporting.owners, last30, now=now)),
        ("owners, every owner, last day", run(reporting.owners, last1, now=now)),
        ("daily, last 30 days", run(reporting.daily, now=now)),
        ("daily, 90 days", run(reporting.daily, reporting.Window(now - timedelta(days=90), now))),
        ("daily, one owner", run(reporting.daily, None, ONE_OWNER, now=now)),
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
    from manager.access.tokens import create_token
    from manager.config import Settings

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
    parser.add_argument(
        "--deliveries", type=int, help="deliveries in all (default: 3 per task, 3,000,000)"
    )
    parser.add_argument("--owners", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", metavar="NAME", help="time a database kept by --keep")
    parser.add_argument(
        "--check-sample",
        type=int,
        default=500,
        metavar="N",
        help="after generating, check that events, tasks and runs agree, replaying N tasks "
        "(and some of every kind) through the service's rules; 0: no checks",
    )
    parser.add_argument(
        "--generate-only",
        action="store_true",
        help="generate (and check) the history, time nothing (with --keep: for --reuse)",
    )
    parser.add_argument("--export-child", nargs=2, metavar=("URL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.deliveries is None:
        args.deliveries = 3 * args.tasks
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
            kinds = generate(engine, args.tasks, args.deliveries, args.owners, now)
            print(f"generated in {time.perf_counter() - started:.1f} s: {row_counts(engine)}")
            print(f"  deliveries: {describe_deliveries(engine, kinds)}")
            if args.check_sample:
                started = time.perf_counter()
                agree = check_history(engine, args.check_sample)
                print(f"  checked in {time.perf_counter() - started:.1f} s")
                if not agree:
                    raise SystemExit("the generated history disagrees with itself (see above)")
        else:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE"))
            print(f"reusing {args.reuse}: {row_counts(engine)}")
        engine.dispose()
        if args.generate_only:
            return

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
