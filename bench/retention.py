"""Callback ingest while old deliveries are pruned, beside ingest alone, in the same run.

    .venv/bin/python bench/retention.py [--tasks 1000000] [--deliveries 3000000]
                                        [--batch-size 1000] [--pause 0.5]
                                        [--rounds 6] [--duration 10] [--check]

Run from the repository root, with PostgreSQL up (trust auth, see --admin-url) and wrk
installed (`apt-get install wrk`). All on 127.0.0.1:

1. creates a fresh database (dropped at the end, even on error, unless --keep-db) and
   writes bench/reports.py's synthetic history into it (`generate`: --tasks tasks and
   their runs, --deliveries deliveries that are their events, resends and rejected
   requests, stop requests), 120 days in the past, so that every delivery is past the
   90-day retention (the tasks still running or stopping, 2.3 %, keep their events).
   Each body is padded to --body-bytes, about a callback's size. Then delivery_hours is
   written (reports.rollups.fill), as the worker does before it prunes;
2. starts `manager serve --workers 4` on it, as bench/callbacks.py does, and a pruning
   process that does what `manager.callbacks.retention.prune` does (a batch of
   --batch-size deliveries per transaction, `prune_batch`, --pause seconds apart), one
   batch at a time, and only while told to;
3. runs wrk against the webhook with fresh signed callbacks (bench/callbacks.py's: the
   starts, updates and stops of new tasks), --duration seconds a run, alternately with
   the pruner paused ("alone") and running ("pruning"), which of the two goes first
   alternating by round, and prints each run, the median rates, their ratio (target:
   pruning >= 0.9x alone) and each pruning run against the alone runs beside it;
4. then lets the pruner finish on its own, at the same pace, and prints how long pruning
   the whole history took (the time it ran, in the rounds and after: its batches and
   pauses), what it deleted, and checks what is left: no delivery past the retention
   but the events of tasks still running or stopping (their bodies dropped), and every
   task and run as before (a checksum of both tables).

On a 2-core machine the callbacks, PostgreSQL and wrk take every core, so whatever the
pruner's process and PostgreSQL backend spend comes out of ingest: --pause holds the
pruner to a share of the machine. The figures move with whatever else runs: compare
medians, and run it twice.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from callbacks import (  # noqa: E402  (bench/callbacks.py)
    APP_ID,
    VENV_BIN,
    WrkResult,
    backend_cpu,
    callback_bodies,
    children_cpu,
    describe,
    group_cpu,
    post,
    run_wrk,
    start,
    stop,
    wait_ready,
    write_bodies,
)
from common import bench_database, free_port  # noqa: E402  (bench/common.py)
from sqlalchemy import Engine, create_engine, text  # noqa: E402

from manager.clock import utcnow  # noqa: E402
from manager.config import KNOWN_VARIABLES  # noqa: E402
from manager.migrate import upgrade  # noqa: E402

TARGET_RATIO = 0.9
RETENTION_DAYS = 90
AGE = timedelta(days=120)  # how far back the generated history's "now" lies
APP_NAME = "bench-manager"
PRUNER_NAME = "bench-pruner"
# What the pruner shares: batches, deliveries seen, deleted, bodies dropped, tasks marked,
# seconds in batches, seconds running (batches and pauses), its process's CPU seconds.
STATS = ("batches", "seen", "deliveries", "bodies", "tasks", "busy", "running", "cpu")


# --------------------------------------------------------------------------- history


def fill_history(url: str, args: argparse.Namespace) -> Engine:
    """Migrate, write the synthetic history AGE in the past, pad its bodies, seal hours."""
    from reports import describe_deliveries, generate, row_counts  # bench/reports.py

    from manager.reports import rollups

    engine = create_engine(url)
    upgrade(engine)
    started = time.perf_counter()
    kinds = generate(engine, args.tasks, args.deliveries, 20_000, utcnow() - AGE, APP_ID)
    print(
        f"history written in {time.perf_counter() - started:.0f} s: {row_counts(engine)}; "
        f"deliveries: {describe_deliveries(engine, kinds)}",
        flush=True,
    )
    if args.body_bytes:
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE deliveries SET raw_body = convert_to(repeat('x', :n), 'UTF8')"),
                {"n": args.body_bytes},
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM FULL ANALYZE deliveries"))
        print(
            f"bodies padded to {args.body_bytes} bytes in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    started = time.perf_counter()
    rollups.fill(engine, utcnow())
    print(f"delivery_hours written in {time.perf_counter() - started:.1f} s", flush=True)
    return engine


def snapshot(engine: Engine, last_task: int) -> dict[str, Any]:
    """Checksums of the history's tasks (ids up to `last_task`) and of their runs, and
    the size of the deliveries table."""
    with engine.connect() as conn:
        runs = conn.execute(
            text(
                "SELECT count(*), sum(hashtext(concat_ws('|', task_pk, run_no, owner, "
                "started_at, ended_at, stop_reason))::numeric) FROM task_runs "
                "WHERE task_pk <= :last"
            ),
            {"last": last_task},
        ).one()
        tasks = conn.execute(
            text(
                "SELECT count(*), sum(hashtext(concat_ws('|', id, task_id, owner, status, "
                "stop_reason, max_seq, runs, input, outputs, started_at, ended_at, "
                "first_seen_at, updated_at, last_delivery_at))::numeric) FROM tasks "
                "WHERE id <= :last"
            ),
            {"last": last_task},
        ).one()
        size = conn.execute(text("SELECT pg_total_relation_size('deliveries')")).scalar_one()
    return {"runs": tuple(runs), "tasks": tuple(tasks), "deliveries_bytes": int(size)}


def leftovers(engine: Engine, cutoff: datetime) -> dict[str, int]:
    """What is left past the retention, by kind; all of it should be events of tasks
    still running or stopping."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """SELECT CASE WHEN d.event_key IS NULL THEN 'not an event'
                               WHEN t.status IN ('running', 'stopping')
                                   THEN 'events of active tasks'
                               ELSE 'events of ended tasks' END AS kind,
                          count(*), count(d.raw_body)
                   FROM deliveries AS d LEFT JOIN tasks AS t ON t.id = d.task_pk
                   WHERE d.received_at < :cutoff GROUP BY 1"""
            ),
            {"cutoff": cutoff},
        ).all()
    out = {}
    for kind, n, with_body in rows:
        out[kind] = int(n)
        out[f"{kind} with a body"] = int(with_body)
    return out


# --------------------------------------------------------------------------- the pruner


def pruner(
    url: str,
    now: datetime,
    batch_size: int,
    pause: float,
    go: Any,
    quit_: Any,
    finished: Any,
    stats: Any,
) -> None:
    """The pruning process: while `go` is set, what retention.prune does (a batch per
    transaction, `pause` seconds apart), a batch at a time so that it stops at once."""
    from manager.callbacks.retention import prune_batch, retention_cutoff, rows_until
    from manager.db import make_engine, write_connection

    engine = make_engine(f"{url}?application_name={PRUNER_NAME}")
    cutoff = retention_cutoff(now, RETENTION_DAYS)
    with engine.connect() as conn:
        until = rows_until(conn, cutoff)
    after = 0
    try:
        while not quit_.is_set():
            if not go.wait(0.05):
                continue
            started = time.perf_counter()
            with write_connection(engine) as conn:
                batch = prune_batch(
                    conn, after_id=after, batch_size=batch_size, cutoff=cutoff, rows_until=until
                )
            busy = time.perf_counter() - started
            if not batch.done:
                time.sleep(pause)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            with stats.get_lock():
                for name, value in (
                    ("batches", 1),
                    ("seen", batch.seen),
                    ("deliveries", batch.deliveries),
                    ("bodies", batch.bodies),
                    ("tasks", batch.tasks),
                    ("busy", busy),
                    ("running", time.perf_counter() - started),
                ):
                    stats[STATS.index(name)] += value
                stats[STATS.index("cpu")] = usage.ru_utime + usage.ru_stime
            after = batch.last_id
            if batch.done:
                finished.set()
                return
    finally:
        engine.dispose()


def read_stats(stats: Any) -> dict[str, float]:
    with stats.get_lock():
        return dict(zip(STATS, list(stats), strict=True))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--deliveries", type=int, default=3_000_000)
    p.add_argument("--body-bytes", type=int, default=450, help="each raw body's size (0: '{}')")
    p.add_argument("--batch-size", type=int, default=1000, help="deliveries per prune batch")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between prune batches")
    p.add_argument("--rounds", type=int, default=6, help="alone+pruning pairs of wrk runs")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured load first")
    p.add_argument("--connections", type=int, default=16, help="wrk -c")
    p.add_argument("--threads", type=int, default=2, help="wrk -t")
    p.add_argument("--workers", type=int, default=4, help="gunicorn workers")
    p.add_argument("--max-rate", type=int, default=4000, help="bodies generated per second")
    p.add_argument(
        "--admin-url",
        default=os.environ.get(
            "BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="PostgreSQL database to connect to for CREATE/DROP DATABASE",
    )
    p.add_argument("--keep-db", action="store_true", help="do not drop the database")
    p.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    p.add_argument("--verbose", action="store_true", help="print wrk's own output too")
    args = p.parse_args(argv)
    if args.connections % args.threads:
        p.error("--connections must be a multiple of --threads (wrk splits them evenly)")
    args.wrk = shutil.which("wrk")
    if args.wrk is None:
        p.error("wrk not found: apt-get install wrk")
    args.rate = 0  # run_wrk's: as fast as it goes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secret, tag = secrets.token_hex(16), secrets.token_hex(3)
    print(
        f"{args.tasks} tasks, {args.deliveries} deliveries {AGE.days} days old; prune batches "
        f"of {args.batch_size}, {args.pause:g} s apart; wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s, {args.rounds} rounds of alone and pruning; "
        f"gunicorn -w {args.workers}; {os.cpu_count()} CPUs, load average "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    spawn = multiprocessing.get_context("spawn")
    with (
        bench_database(args.admin_url, args.keep_db, prefix="manager_bench_retention") as url,
        tempfile.TemporaryDirectory(prefix="manager-bench-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        engine = fill_history(url, args)
        with engine.connect() as conn:
            last_task = int(conn.execute(text("SELECT max(id) FROM tasks")).scalar_one())
        before = snapshot(engine, last_task)
        now = utcnow()
        cutoff = now - timedelta(days=RETENTION_DAYS)
        go, quit_, finished = spawn.Event(), spawn.Event(), spawn.Event()
        stats = spawn.Array("d", len(STATS))
        prune_proc = spawn.Process(
            target=pruner,
            args=(url, now, args.batch_size, args.pause, go, quit_, finished, stats),
        )
        metrics_dir = tmp / "metrics"
        metrics_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES}
        manager_env = env | {
            "DATABASE_URL": f"{url}?application_name={APP_NAME}",
            "ZEGO_APP_ID": str(APP_ID),
            "ZEGO_CALLBACK_SECRET": secret,
            "SECRET_KEY": secrets.token_hex(16),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        port, log = free_port(), tmp / "manager.log"
        server = start(
            [
                str(VENV_BIN / "manager"),
                *("serve", "--host", "127.0.0.1", "--port", str(port)),
                *("--workers", str(args.workers)),
            ],
            manager_env,
            log,
        )
        results: dict[str, list[WrkResult]] = {"alone": [], "pruning": []}
        pruned_in: list[dict[str, float]] = []
        try:
            prune_proc.start()
            base = f"http://127.0.0.1:{port}"
            wait_ready(f"{base}/readyz", server, log)
            webhook = f"{base}/callbacks/zego"
            status, answer = post(webhook, next(callback_bodies(secret, f"{tag}-probe", 1)))
            if status != 200 or answer.get("verdict") != "applied":
                raise RuntimeError(f"probe callback answered {status} {answer}")
            per_thread = max(64 * 3, args.max_rate * args.duration // args.threads)
            run_no = 0

            def measure(condition: str, duration: int) -> WrkResult:
                nonlocal run_no
                run_no += 1
                prefix = tmp / f"bodies-{run_no}"
                write_bodies(prefix, args.threads, per_thread, secret, f"{tag}-r{run_no}")
                app0, db0, wrk0 = (
                    group_cpu(server.pid),
                    backend_cpu(engine, APP_NAME),
                    children_cpu(),
                )
                stats0 = read_stats(stats)
                pruner0 = backend_cpu(engine, PRUNER_NAME)
                if condition == "pruning":
                    go.set()
                try:
                    result = run_wrk(condition, webhook, prefix, args, duration)
                finally:
                    go.clear()
                db = sum(c - db0.get(pid, 0.0) for pid, c in backend_cpu(engine, APP_NAME).items())
                if result.requests:
                    result = replace(
                        result,
                        cpu_app_ms=(group_cpu(server.pid) - app0) * 1000 / result.requests,
                        cpu_db_ms=db * 1000 / result.requests,
                        cpu_wrk_ms=(children_cpu() - wrk0) * 1000 / result.requests,
                    )
                stats1 = read_stats(stats)
                pruned_in.append({k: stats1[k] - stats0[k] for k in STATS})
                pruner1 = backend_cpu(engine, PRUNER_NAME)
                pruned_in[-1]["db_cpu"] = sum(
                    c - pruner0.get(pid, 0.0) for pid, c in pruner1.items()
                )
                for tid in range(args.threads):
                    Path(f"{prefix}.{tid}").unlink()
                return result

            if args.warmup:
                measure("alone", args.warmup)
            for round_no in range(1, args.rounds + 1):
                order = ("alone", "pruning") if round_no % 2 else ("pruning", "alone")
                for condition in order:
                    r = measure(condition, args.duration)
                    time.sleep(0.5)  # requests cut off by wrk's stop finish
                    results[condition].append(r)
                    done = pruned_in[-1]
                    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
                    print(
                        f"round {round_no} {describe(r)}  load={load}"
                        + (
                            f"  pruned {done['deliveries']:.0f} deliveries, "
                            f"{done['bodies']:.0f} bodies in {done['batches']:.0f} batches; "
                            f"pruner cpu {done['cpu']:.1f} s, its backend {done['db_cpu']:.1f} s"
                            if condition == "pruning"
                            else ""
                        ),
                        flush=True,
                    )
            in_rounds = read_stats(stats)
            print(
                f"the pruner ran {in_rounds['running']:.0f} s in the rounds; finishing alone, "
                "at the same pace",
                flush=True,
            )
            go.set()
            while not finished.wait(30):
                s = read_stats(stats)
                print(
                    f"  ... {s['seen']:.0f} deliveries looked at, {s['deliveries']:.0f} "
                    f"deleted, {s['running']:.0f} s",
                    flush=True,
                )
                if not prune_proc.is_alive():
                    raise RuntimeError("the pruner died")
        finally:
            quit_.set()
            go.set()
            prune_proc.join(timeout=60)
            if prune_proc.is_alive():
                prune_proc.terminate()
            stop(server)
        total = read_stats(stats)
        after = snapshot(engine, last_task)
        left = leftovers(engine, cutoff)
        engine.dispose()
    return report(results, total, before, after, left, args)


def report(
    results: dict[str, list[WrkResult]],
    total: dict[str, float],
    before: dict[str, Any],
    after: dict[str, Any],
    left: dict[str, int],
    args: argparse.Namespace,
) -> int:
    alone, pruning = results["alone"], results["pruning"]
    alone_rate = statistics.median(r.rate for r in alone)
    pruning_rate = statistics.median(r.rate for r in pruning)
    ratio = pruning_rate / alone_rate if alone_rate else 0.0
    # Each pruning run against the alone runs beside it (in its round, and the next).
    paired = []
    for i, r in enumerate(pruning):
        beside = [a.rate for a in alone[max(0, i - 1) : i + 2] if a.rate]
        if beside:
            paired.append(r.rate / statistics.mean(beside))
    bad = sum(r.non_2xx + r.socket_errors for r in alone + pruning)
    print()
    for name, runs in results.items():
        print(
            f"{name:8} median {statistics.median(r.rate for r in runs):8.1f} req/s   median p99 "
            f"{statistics.median(r.p99_ms for r in runs):6.2f} ms   cpu/request: app "
            f"{statistics.median(r.cpu_app_ms for r in runs):.2f} ms, PostgreSQL backends "
            f"{statistics.median(r.cpu_db_ms for r in runs):.2f} ms"
        )
    print(
        f"ratio    pruning/alone = {ratio:.3f}  (target >= {TARGET_RATIO})"
        + (
            f"   paired: median {statistics.median(paired):.3f}, from {min(paired):.3f} "
            f"to {max(paired):.3f}"
            if paired
            else ""
        )
    )
    rate = total["seen"] / total["running"] if total["running"] else 0.0
    print(
        f"pruning  {total['seen']:.0f} deliveries looked at in {total['batches']:.0f} batches "
        f"of {args.batch_size}, {args.pause:g} s apart: {total['running']:.0f} s in all "
        f"({total['running'] / 60:.1f} min, {rate:.0f} deliveries/s), of which "
        f"{total['busy']:.0f} s in batches (the process's CPU: {total['cpu']:.0f} s); "
        f"deleted {total['deliveries']:.0f} deliveries "
        f"and the events of {total['tasks']:.0f} tasks, dropped {total['bodies']:.0f} bodies"
    )
    print(
        f"deliveries table {before['deliveries_bytes'] / 2**20:.0f} MiB before, "
        f"{after['deliveries_bytes'] / 2**20:.0f} MiB after (space VACUUM may reuse)"
    )
    print(f"left past the retention: {left}")
    unchanged = before["runs"] == after["runs"] and before["tasks"] == after["tasks"]
    print(
        f"the history's {before['tasks'][0]} tasks and {before['runs'][0]} runs unchanged "
        f"(checksums): {'yes' if unchanged else 'NO'}"
    )
    ok_left = left.get("not an event", 0) == 0 and left.get("events of ended tasks", 0) == 0
    ok_left &= all(v == 0 for k, v in left.items() if k.endswith("with a body"))
    ok_ratio = ratio >= TARGET_RATIO
    print(
        f"target pruning/alone >= {TARGET_RATIO}: {'PASS' if ok_ratio else 'FAIL'}   "
        f"all 200: {'PASS' if not bad else 'FAIL'}   "
        f"only active tasks' events left, without bodies: {'PASS' if ok_left else 'FAIL'}   "
        f"tasks and runs unchanged: {'PASS' if unchanged else 'FAIL'}"
    )
    if bad or not ok_left or not unchanged:
        return 1
    return 1 if args.check and not ok_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
