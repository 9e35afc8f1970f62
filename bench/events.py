"""Outbound events (issue 15) on PostgreSQL: ingest with subscriptions, and delivery.

Run it from the repository root, with PostgreSQL up (trust auth, see --admin-url) and
wrk installed (`apt-get install wrk`):

    .venv/bin/python bench/events.py                      # both parts, a few minutes
    .venv/bin/python bench/events.py --part ingest --rounds 8
    .venv/bin/python bench/events.py --part delivery --events 50000 --event-threads 16,32,64
    .venv/bin/python bench/events.py --part delivery --prefill sql --due-together \
        --event-threads 8,32,64                           # a backlog due at once (a replay)
    .venv/bin/python bench/events.py --part delivery --worker-processes 2
    .venv/bin/python bench/events.py --part delivery --py-spy PATH/py-spy   # profile it
    .venv/bin/python bench/events.py --check              # exit 1 when a target is missed

Everything runs on 127.0.0.1, in a database of its own (bench_events_..., dropped at
the end unless --keep-db) and a directory of its own under /tmp/bench_events/.

1. **Ingest with subscriptions** (target: >= 0.8x the rate without). `manager serve
   --workers 4` takes bench/callbacks.py's workload (wrk, fresh signed callbacks: the
   starts, updates and stops of new tasks, blocks of 64 tasks), --duration seconds a
   run, alternately (a) with no subscription at all and (b) with --subscriptions
   enabled subscriptions that take every event (their URL is never called: no worker
   runs, so this is the cost of writing the outbox in the callback's statement); which
   of the two goes first alternates by round. After each (b) run the outbox is checked:
   the run's tasks must have exactly as many events as their versions add up to (every
   event emitted was stored) and --subscriptions sends per event; then it is emptied
   (TRUNCATE) and the subscriptions go, so that every run starts alike. After each (a)
   run the outbox must be empty. Prints each run, the medians, their ratio, each (b)
   run against the (a) run of its round, and CPU per request of the app processes and
   of their PostgreSQL backends.
2. **Delivery** (target: >= 500 deliveries/s). --delivery-subscriptions subscriptions
   point at bench/events_receiver.py (asyncio, --receiver-processes processes, checks
   every signature with standardwebhooks); the outbox is filled with at least --events
   events while no worker runs, by callbacks through `manager serve` (--prefill
   callbacks: the real path) or by INSERTs (--prefill sql: 4 events a task, faster for
   large counts); then `manager worker --event-threads T` (the real command) sends it
   all, once per T in --event-threads (in between, every send is made pending and
   untried again, and the receiver restarted). The rate is a delivery (one event
   to one subscription, one POST answered 2xx and recorded) per second, from the first
   request the receiver saw to the last; also printed: the rate the database records
   (first attempt to last completion), the steady rate (10th to 90th percentile
   arrival), CPU per delivery of the worker, its PostgreSQL backends and the receiver,
   and how busy the machine was. Checks: every send delivered in one attempt, every
   request verified, each (subscription, event) received exactly once (no duplicate
   webhook-id), and per subscription and task the versions arrived in increasing
   order with none missing. --worker-processes N runs N workers side by side;
   --due-together makes every send due at one instant, as `manager events replay`
   does (the claim's ORDER BY next_attempt_at, id then has no index to follow);
   --py-spy PATH samples the (first) worker while it holds the GIL and prints where
   its time goes (install py-spy anywhere, e.g. pip install --target DIR py-spy).

The machine is shared with PostgreSQL and wrk: compare ratios measured side by side,
and run it twice. autovacuum may be off (as on the test machine): the outbox tables are
VACUUM ANALYZEd after they are filled, as autovacuum would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from callbacks import (  # bench/callbacks.py, beside this script
    APP_ID,
    BLOCK,
    VENV_BIN,
    WrkResult,
    backend_cpu,
    callback_bodies,
    children_cpu,
    describe,
    diff_counts,
    group_cpu,
    post,
    run_wrk,
    start,
    stop,
    verdict_counts,
    wait_ready,
    write_bodies,
)
from common import bench_database, free_port, insert_running_tasks  # bench/common.py
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.config import KNOWN_VARIABLES
from manager.events.secrets import Sealer, new_key
from manager.events.subscriptions import create_subscription

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TMP_ROOT = Path("/tmp/bench_events")  # noqa: S108 - this benchmark's own directory

TARGET_INGEST_RATIO = 0.8
TARGET_DELIVERY_RATE = 500.0
MANAGER_NAME = "bench-manager"  # PostgreSQL application_name of the app's connections
WORKER_NAME = "bench-worker"  # ... and of the worker's
MODES = {"a": "no subs", "b": "subs"}


# --------------------------------------------------------------------------- outbox


def outbox_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM subscriptions), (SELECT count(*) FROM events), "
                "(SELECT count(*) FROM event_sends), (SELECT count(*) FROM event_attempts)"
            )
        ).one()
    return dict(zip(("subscriptions", "events", "sends", "attempts"), map(int, row), strict=True))


def clear_outbox(engine: Engine) -> None:
    """No subscription, no event, no send: as before the first (b) run."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE subscriptions, events, event_sends, event_attempts"))


def add_subscriptions(engine: Engine, key: str, urls: list[str]) -> list[tuple[int, str]]:
    """Subscriptions to every event, as `manager subscriptions create URL` makes them:
    their ids and their secrets (shown once)."""
    made = []
    with Session(engine) as session:
        for url in urls:
            created = create_subscription(session, Sealer((key,)), url=url, now=utcnow())
            made.append((created.subscription.id, created.secret))
        session.commit()
    return made


def vacuum_outbox(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("tasks", "subscriptions", "events", "event_sends", "event_attempts"):
            conn.execute(text(f"VACUUM ANALYZE {table}"))


def round_outbox(engine: Engine, prefix: str) -> dict[str, int]:
    """What the outbox holds for the tasks whose ids start with `prefix` (one run's)."""
    with engine.connect() as conn:
        tasks, versions = conn.execute(
            text("SELECT count(*), coalesce(sum(version), 0) FROM tasks WHERE task_id LIKE :p"),
            {"p": prefix + "%"},
        ).one()
        events = conn.execute(
            text(
                "SELECT count(*) FROM events e JOIN tasks t ON t.id = e.task_pk "
                "WHERE t.task_id LIKE :p"
            ),
            {"p": prefix + "%"},
        ).scalar_one()
        sends = conn.execute(
            text(
                "SELECT count(*) FROM event_sends s JOIN tasks t ON t.id = s.task_pk "
                "WHERE t.task_id LIKE :p"
            ),
            {"p": prefix + "%"},
        ).scalar_one()
    return {"tasks": int(tasks), "versions": int(versions), "events": int(events), "sends": sends}


# --------------------------------------------------------------------------- part 1


@dataclass
class IngestRun:
    mode: str  # "a" (no subscriptions) or "b" (subscriptions)
    round_no: int
    wrk: WrkResult
    outbox: dict[str, int] = field(default_factory=dict)
    ok: bool = True
    note: str = ""


def ingest_part(
    args: argparse.Namespace,
    engine: Engine,
    url: str,
    server: subprocess.Popen[bytes],
    tmp: Path,
    secret: str,
    tag: str,
    key: str,
) -> list[IngestRun]:
    # Subscriptions of the (b) runs: nothing listens there and no worker runs.
    sub_urls = [f"http://127.0.0.1:9/ingest-only/{i}" for i in range(1, args.subscriptions + 1)]
    per_thread = max(BLOCK * 3, args.max_rate * args.duration // args.threads)
    run_no = 0

    def measure(mode: str, duration: int) -> tuple[WrkResult, str]:
        nonlocal run_no
        run_no += 1
        run_tag = f"{tag}-r{run_no}"
        prefix = tmp / f"bodies-{run_no}"
        write_bodies(prefix, args.threads, per_thread, secret, run_tag)
        app0, db0, wrk0 = group_cpu(server.pid), backend_cpu(engine, MANAGER_NAME), children_cpu()
        r = run_wrk(MODES[mode], url, prefix, args, duration)
        if r.requests:
            db1 = backend_cpu(engine, MANAGER_NAME)
            db = sum(cpu - db0.get(pid, 0.0) for pid, cpu in db1.items())
            r = replace(
                r,
                cpu_app_ms=(group_cpu(server.pid) - app0) * 1000 / r.requests,
                cpu_db_ms=db * 1000 / r.requests,
                cpu_wrk_ms=(children_cpu() - wrk0) * 1000 / r.requests,
            )
        for tid in range(args.threads):
            Path(f"{prefix}.{tid}").unlink()
        return r, f"bench-{run_tag}-"

    clear_outbox(engine)
    if args.warmup:
        for mode in ("a", "b"):
            if mode == "b":
                add_subscriptions(engine, key, sub_urls)
            measure(mode, args.warmup)
            time.sleep(0.5)
            clear_outbox(engine)

    runs: list[IngestRun] = []
    for round_no in range(1, args.rounds + 1):
        for mode in ("a", "b") if round_no % 2 else ("b", "a"):
            if mode == "b":
                add_subscriptions(engine, key, sub_urls)
            before = verdict_counts(engine)
            r, prefix = measure(mode, args.duration)
            time.sleep(0.5)  # let the requests cut off by wrk's stop finish
            verdicts = diff_counts(verdict_counts(engine), before)
            run = IngestRun(mode, round_no, r)
            run.outbox = round_outbox(engine, prefix)
            totals = outbox_counts(engine)
            o = run.outbox
            if mode == "b":
                # Every event emitted was stored (each took one of its task's versions),
                # and fanned out to every subscription.
                run.ok = (
                    o["events"] > 0
                    and o["events"] == o["versions"]
                    and o["sends"] == args.subscriptions * o["events"]
                    and totals["events"] == o["events"]
                )
                run.note = (
                    f"outbox: {o['tasks']} tasks, versions {o['versions']}, events "
                    f"{o['events']}, sends {o['sends']} (= {args.subscriptions} x events: "
                    f"{'yes' if o['sends'] == args.subscriptions * o['events'] else 'NO'}), "
                    f"{o['events'] / max(r.requests, 1):.2f} events/request"
                )
            else:
                run.ok = totals["events"] == 0 and totals["sends"] == 0 and o["versions"] > 0
                run.note = (
                    f"outbox: {o['tasks']} tasks, versions {o['versions']}, "
                    f"events {totals['events']}, sends {totals['sends']} (none expected)"
                )
            rejected = sum(n for k, n in verdicts.items() if k.startswith("rejected"))
            if r.non_2xx or r.socket_errors or rejected:
                run.ok = False
            runs.append(run)
            load = "/".join(f"{x:.1f}" for x in os.getloadavg())
            print(
                f"round {round_no} ({mode}) {describe(r)}  load={load}  verdicts={verdicts}\n"
                f"    {run.note}{'' if run.ok else '  CHECK FAILED'}",
                flush=True,
            )
            if mode == "b":
                clear_outbox(engine)
    return runs


def report_ingest(runs: list[IngestRun], args: argparse.Namespace) -> bool:
    a = [r for r in runs if r.mode == "a"]
    b = [r for r in runs if r.mode == "b"]
    rate_a = statistics.median(r.wrk.rate for r in a)
    rate_b = statistics.median(r.wrk.rate for r in b)
    ratio = rate_b / rate_a if rate_a else 0.0
    paired = [
        rb.wrk.rate / ra.wrk.rate
        for ra, rb in zip(a, b, strict=True)
        if ra.round_no == rb.round_no and ra.wrk.rate
    ]

    def cpu(rs: list[IngestRun]) -> str:
        app = statistics.median(r.wrk.cpu_app_ms for r in rs)
        db = statistics.median(r.wrk.cpu_db_ms for r in rs)
        p99 = statistics.median(r.wrk.p99_ms for r in rs)
        return f"median p99 {p99:6.2f} ms   cpu/request: app {app:.2f} ms, PostgreSQL {db:.2f} ms"

    print()
    print("== 1. ingest with subscriptions")
    print(f"(a) no subscriptions          median {rate_a:8.1f} req/s   {cpu(a)}")
    print(
        f"(b) {args.subscriptions} subscriptions, all events median {rate_b:8.1f} req/s   {cpu(b)}"
    )
    print(f"ratio (b)/(a) of the medians = {ratio:.3f}  (target >= {TARGET_INGEST_RATIO})")
    print(
        "paired, (b)/(a) in each round: "
        + ", ".join(f"{p:.3f}" for p in paired)
        + (f"  (median {statistics.median(paired):.3f})" if paired else "")
    )
    events = sum(r.outbox["events"] for r in b)
    sends = sum(r.outbox["sends"] for r in b)
    checks = all(r.ok for r in runs)
    print(
        f"outbox in the (b) runs: {events} events, {sends} sends written "
        f"({args.subscriptions} per event: "
        f"{'yes' if sends == args.subscriptions * events else 'NO'}); "
        f"(a) runs wrote none: {'yes' if all(r.ok for r in a) else 'NO'}"
    )
    # CPU per request is steadier than the rate on a shared machine: where every core is
    # busy, the rates would stand in the inverse ratio of what a request costs.
    cost_a = statistics.median(r.wrk.cpu_app_ms + r.wrk.cpu_db_ms for r in a)
    cost_b = statistics.median(r.wrk.cpu_app_ms + r.wrk.cpu_db_ms for r in b)
    print(
        f"cpu/request, app + PostgreSQL: (a) {cost_a:.2f} ms, (b) {cost_b:.2f} ms: "
        f"(b) costs {100 * (cost_b / cost_a - 1):+.0f}%, a CPU-bound ratio of "
        f"{cost_a / cost_b:.3f} (a diagnostic, not the target)"
    )
    ok = ratio >= TARGET_INGEST_RATIO
    print(
        f"target ingest (b)/(a) >= {TARGET_INGEST_RATIO}: {'PASS' if ok else 'FAIL'}   "
        f"all 200, none rejected, outbox as expected: {'PASS' if checks else 'FAIL'}"
    )
    return ok and checks


# --------------------------------------------------------------------------- part 2


def prefill_callbacks(
    args: argparse.Namespace, engine: Engine, url: str, tmp: Path, secret: str, tag: str
) -> None:
    """Callbacks through `manager serve`, a few seconds at a time, until the outbox holds
    at least --events events."""
    chunk = 5
    per_thread = max(BLOCK * 3, args.max_rate * chunk // args.threads)
    n = 0
    started = time.perf_counter()
    while outbox_counts(engine)["events"] < args.events:
        n += 1
        prefix = tmp / f"fill-{n}"
        write_bodies(prefix, args.threads, per_thread, secret, f"{tag}-fill{n}")
        r = run_wrk("fill", url, prefix, args, chunk)
        for tid in range(args.threads):
            Path(f"{prefix}.{tid}").unlink()
        if r.non_2xx or r.socket_errors:
            raise RuntimeError(f"filling the outbox: {describe(r)}")
    time.sleep(0.5)
    print(
        f"outbox filled by callbacks in {time.perf_counter() - started:.0f} s: "
        f"{outbox_counts(engine)}",
        flush=True,
    )


# An event's body, as manager/callbacks/outbound.py makes it (a task's snapshot).
_SQL_TYPES = "(ARRAY['task.started','task.updated','run.ended','task.stopped'])[v]"
_SQL_BODY = f"""json_build_object(
    'type', {_SQL_TYPES},
    'timestamp', to_char(now() AT TIME ZONE 'utc', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
    'data', json_build_object(
        'version', v,
        'task', json_build_object(
            'task_id', t.task_id, 'app_id', t.app_id, 'owner', t.owner,
            'status', CASE WHEN v < 3 THEN 'running' ELSE 'stopped' END,
            'stop_reason', CASE WHEN v < 3 THEN NULL ELSE 0 END, 'sequence', v,
            'runs', 1, 'input', json_build_object('StreamId', 'in-' || t.task_id),
            'outputs', json_build_array(json_build_object(
                'StreamId', 'out-' || t.task_id, 'Width', 1280, 'Height', 720)),
            'started_at', to_char(t.started_at, 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            'ended_at', NULL)))::text"""


def prefill_sql(engine: Engine, events: int, tag: str) -> None:
    """Tasks with 4 events each (started, updated, run.ended, stopped), fanned out to
    every subscription, in bulk; ids in the order callbacks would write them (blocks of
    tasks: all their first versions, then their second, ...)."""
    started = time.perf_counter()
    tasks = -(-events // 4)
    with engine.begin() as conn:
        first = conn.execute(text("SELECT coalesce(max(id), 0) FROM tasks")).scalar_one()
        insert_running_tasks(conn, APP_ID, tasks, f"'bench-{tag}-sql-' || g")
        conn.execute(text("UPDATE tasks SET version = 4 WHERE id > :first"), {"first": first})
        # Written 1 ms apart, as callbacks at about 1,000/s would write them.
        conn.execute(
            text(
                "INSERT INTO events (task_pk, version, type, body, created_at) "  # noqa: S608
                f"SELECT t.id, v, {_SQL_TYPES}, {_SQL_BODY}, "
                "now() AT TIME ZONE 'utc' - interval '1 day' + interval '1 millisecond' * "
                f"row_number() OVER (ORDER BY (t.id - :first - 1) / {BLOCK}, v, t.id) "
                "FROM tasks t CROSS JOIN generate_series(1, 4) AS v WHERE t.id > :first "
                f"ORDER BY (t.id - :first - 1) / {BLOCK}, v, t.id"
            ),
            {"first": first},
        )
        conn.execute(
            text(
                "INSERT INTO event_sends (subscription_id, event_id, task_pk, version, state, "
                "attempts, next_attempt_at, created_at) "
                "SELECT s.id, e.id, e.task_pk, e.version, 'pending', 0, e.created_at, "
                "e.created_at FROM events e CROSS JOIN subscriptions s "
                "WHERE e.task_pk > :first ORDER BY e.id, s.id"
            ),
            {"first": first},
        )
    print(
        f"outbox filled by INSERTs in {time.perf_counter() - started:.1f} s: "
        f"{outbox_counts(engine)}",
        flush=True,
    )


def reset_outbox(engine: Engine, due_together: bool) -> None:
    """Every send pending again and never tried, due as when it was written, or all at
    one instant (--due-together), as `manager events replay` makes them."""
    due = "now() AT TIME ZONE 'utc' - interval '1 second'" if due_together else "created_at"
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE event_attempts"))
        conn.execute(
            text(
                "UPDATE event_sends SET state = 'pending', attempts = 0, claimed_until = NULL, "  # noqa: S608
                f"completed_at = NULL, next_attempt_at = {due}"
            )
        )
        conn.execute(text("UPDATE subscriptions SET failing_since = NULL, last_success_at = NULL"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM FULL event_sends"))
    vacuum_outbox(engine)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass
class DeliveryRun:
    threads: int
    processes: int
    sends: int
    events: int
    delivered: int = 0
    seconds: float = 0.0  # first request received to last
    rate: float = 0.0  # deliveries/s over `seconds`
    steady_rate: float = 0.0  # between the 10th and 90th percentile arrivals
    db_rate: float = 0.0  # the database's: first attempt to last completion
    per_second: tuple[int, int, int] = (0, 0, 0)  # min, median, max over whole seconds
    cpu_worker_ms: float = 0.0
    cpu_db_ms: float = 0.0
    cpu_receiver_ms: float = 0.0
    machine_busy: float = 0.0  # share of all cores busy in the window
    worker_cores: float = 0.0  # the worker's CPU seconds per second in the window
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_received(log_dir: Path) -> list[list[str]]:
    rows = []
    for path in log_dir.glob("received-*.tsv"):
        for line in path.read_text().splitlines():
            rows.append(line.split("\t"))
    rows.sort(key=lambda r: int(r[0]))
    return rows


def delivery_run(
    args: argparse.Namespace,
    engine: Engine,
    db_url: str,
    tmp: Path,
    threads: int,
    key: str,
    subs: list[tuple[int, str]],
    env: dict[str, str],
) -> DeliveryRun:
    port = free_port()
    paths = {f"/s/{sub_id}": secret for sub_id, secret in subs}
    with engine.begin() as conn:
        for sub_id, _ in subs:
            conn.execute(
                text("UPDATE subscriptions SET url = :url WHERE id = :id"),
                {"url": f"http://127.0.0.1:{port}/s/{sub_id}", "id": sub_id},
            )
    secrets_file = tmp / f"secrets-{threads}.json"
    secrets_file.touch(mode=0o600)
    secrets_file.write_text(json.dumps(paths))
    log_dir = tmp / f"received-{threads}"
    counts = outbox_counts(engine)
    run = DeliveryRun(threads, args.worker_processes, counts["sends"], counts["events"])
    receiver = start(
        [
            sys.executable,
            str(BENCH_DIR / "events_receiver.py"),
            "--port",
            str(port),
            "--secrets",
            str(secrets_file),
            "--log-dir",
            str(log_dir),
            "--processes",
            str(args.receiver_processes),
        ],
        env,
        tmp / f"receiver-{threads}.log",
    )
    workers: list[subprocess.Popen[bytes]] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        _wait_port(port, receiver, tmp / f"receiver-{threads}.log")
        worker_env = env | {
            "DATABASE_URL": f"{db_url}?application_name={WORKER_NAME}",
            "SUBSCRIPTION_KEY": key,
            "ZEGO_APP_ID": str(APP_ID),
            "ZEGO_SERVER_SECRET": "0" * 32,  # the stop dispatcher needs one; never used
            "ZEGO_API_URL": "http://127.0.0.1:9/",  # nothing is stopped here
            "SECRET_KEY": secrets.token_hex(16),
        }
        cmd = [str(VENV_BIN / "manager"), "worker", "--event-threads", str(threads)]
        cmd += args.worker_option
        print(
            f"delivery: {args.worker_processes} x {' '.join(cmd[1:])} -> receiver :{port} "
            f"x{args.receiver_processes}",
            flush=True,
        )
        for n in range(args.worker_processes):
            workers.append(start(cmd, worker_env, tmp / f"worker-{threads}-{n}.log"))
        started = time.monotonic()
        if args.py_spy:
            profile = tmp / f"worker-{threads}.folded"
            spy = start(
                [
                    args.py_spy,
                    "record",
                    "--gil",
                    "--nonblocking",
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "-o",
                    str(profile),
                    "--pid",
                    str(workers[0].pid),
                ],
                env,
                tmp / f"py-spy-{threads}.log",
            )
        # Samples (monotonic, delivered, worker cpu, receiver cpu, machine busy/total).
        samples: list[tuple[float, int, float, float, float, float]] = []
        backend_total = 0.0
        while True:
            time.sleep(0.5)
            with engine.connect() as conn:
                delivered, pending = conn.execute(
                    text(
                        "SELECT count(*) FILTER (WHERE state = 'delivered'), "
                        "count(*) FILTER (WHERE state = 'pending') FROM event_sends"
                    )
                ).one()
            busy, total = machine_cpu()
            samples.append(
                (
                    time.monotonic(),
                    int(delivered),
                    sum(group_cpu(w.pid) for w in workers),
                    group_cpu(receiver.pid),
                    busy,
                    total,
                )
            )
            if pending == 0 or any(w.poll() is not None for w in workers):
                break
            if time.monotonic() - started > args.delivery_timeout:
                run.notes.append(f"timed out after {args.delivery_timeout} s, {pending} pending")
                break
        # The worker's PostgreSQL backends, before it goes (cumulative since they began).
        backend_total = sum(backend_cpu(engine, WORKER_NAME).values())
        first = next((s for s in samples if s[1] > 0), samples[0])
        last = samples[-1]
        done_between = last[1] - first[1]
        if done_between > 0:
            run.cpu_worker_ms = (last[2] - first[2]) * 1000 / done_between
            run.cpu_receiver_ms = (last[3] - first[3]) * 1000 / done_between
            run.machine_busy = (last[4] - first[4]) / max(last[5] - first[5], 1)
            run.worker_cores = (last[2] - first[2]) / max(last[0] - first[0], 1e-9)
        for w in workers:
            if w.poll() is not None:
                run.notes.append(f"a worker exited ({w.returncode}) before the end")
    finally:
        if spy is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, signal.SIGINT)  # py-spy writes its profile on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
            stop(spy)
        for w in workers:
            stop(w)
        stop(receiver)
    if spy is not None:
        run.notes.append(summarize_profile(tmp / f"worker-{threads}.folded"))

    # --- what the database says
    with engine.connect() as conn:
        states = dict(
            conn.execute(text("SELECT state, count(*) FROM event_sends GROUP BY state")).all()
        )
        attempts, failed_attempts, first_at, last_at = conn.execute(
            text(
                "SELECT count(*), count(*) FILTER (WHERE status IS NULL OR status NOT BETWEEN "
                "200 AND 299), min(attempted_at), (SELECT max(completed_at) FROM event_sends) "
                "FROM event_attempts"
            )
        ).one()
        expected = {
            (f"/s/{sub_id}", f"evt_{event_id}"): (task_id, int(version))
            for sub_id, event_id, task_id, version in conn.execute(
                text(
                    "SELECT s.subscription_id, s.event_id, t.task_id, s.version "
                    "FROM event_sends s JOIN tasks t ON t.id = s.task_pk"
                )
            )
        }
    run.delivered = int(states.get("delivered", 0))
    if first_at is not None and last_at is not None and last_at > first_at:
        run.db_rate = run.delivered / (last_at - first_at).total_seconds()

    # --- what the receiver says
    rows = read_received(log_dir)
    ok_rows = [r for r in rows if r[7] == "200"]
    times = [int(r[0]) for r in ok_rows]
    if len(times) > 1:
        run.seconds = (times[-1] - times[0]) / 1e9
        run.rate = (len(times) - 1) / run.seconds if run.seconds else 0.0
        lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
        if hi > lo:
            run.steady_rate = (len(times) * 8 // 10) / ((hi - lo) / 1e9)
        buckets = Counter((t - times[0]) // 1_000_000_000 for t in times)
        whole = [buckets.get(s, 0) for s in range(max(buckets))]  # the last is partial
        if whole:
            run.per_second = (min(whole), int(statistics.median(whole)), max(whole))
    seen = Counter((r[1], r[2]) for r in ok_rows)
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    unverified = sum(1 for r in rows if r[3] != "1")
    missing = len(set(expected) - set(seen))
    unexpected = len(set(seen) - set(expected))
    mismatched = sum(
        1
        for r in ok_rows
        if (r[1], r[2]) in expected and expected[(r[1], r[2])] != (r[5], int(r[6] or 0))
    )
    lines: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in ok_rows:
        lines[(r[1], r[5])].append(int(r[6]))
    out_of_order = sum(
        1
        for versions in lines.values()
        for x, y in zip(versions, versions[1:], strict=False)
        if y <= x
    )
    gaps = sum(
        1 for versions in lines.values() if sorted(versions) != list(range(1, len(versions) + 1))
    )
    if run.cpu_worker_ms and done_between:
        # Backends live only while the worker runs: their whole CPU, over all deliveries.
        run.cpu_db_ms = backend_total * 1000 / max(run.delivered, 1)
    run.checks = {
        "every send delivered": run.delivered == run.sends and not states.keys() - {"delivered"},
        "one attempt each (no retry)": attempts == run.sends and failed_attempts == 0,
        "receiver verified every request": unverified == 0 and len(rows) == len(ok_rows),
        "each received once (no duplicate webhook-id)": duplicates == 0,
        "all received, nothing unexpected, bodies match": (
            missing == 0 and unexpected == 0 and mismatched == 0
        ),
        "versions per task in increasing order": out_of_order == 0,
        "no version missing per task": gaps == 0,
    }
    run.notes.append(
        f"database: {dict(states)}, {attempts} attempts ({failed_attempts} failed); receiver: "
        f"{len(rows)} requests, {len(ok_rows)} verified+200, {unverified} unverified, "
        f"{duplicates} duplicates, {missing} missing, {unexpected} unexpected, "
        f"{mismatched} not matching their send, {len(lines)} (subscription, task) lines, "
        f"{out_of_order} out of order, {gaps} with gaps"
    )
    return run


# Where the worker's time goes, by the frames a sample holds (inclusive).
PROFILE_PARTS = {
    "POST (requests, urllib3, http.client)": ("(requests/", "(urllib3/", "(http/client"),
    "signing (standardwebhooks)": ("(standardwebhooks/",),
    "claim (SQL)": ("_claim (manager/events/sender",),
    "record (SQL)": ("_record (manager/events/sender",),
    "SQLAlchemy": ("(sqlalchemy/",),
    "psycopg": ("(psycopg/",),
    "stop worker": ("(manager/stops/",),
}


def summarize_profile(path: Path) -> str:
    """The worker's samples holding the GIL: the share of each part, and the top frames
    by own time."""
    if not path.exists():
        return f"no profile written ({path.name})"
    total = 0
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1].split(" (")[0] + " (" + frames[-1].split(" (")[-1]] += n
        for part, marks in PROFILE_PARTS.items():
            if any(mark in stack for mark in marks):
                parts[part] += n
    if not total:
        return "empty profile"
    share = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in parts.most_common())
    top = "; ".join(f"{frame} {100 * n / total:.1f}%" for frame, n in own.most_common(8))
    return f"py-spy --gil, {total} samples, inclusive: {share}\n    own time: {top}"


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"receiver not listening on {port}:\n{log.read_text()}")


def delivery_part(
    args: argparse.Namespace,
    engine: Engine,
    db_url: str,
    url: str,
    tmp: Path,
    secret: str,
    tag: str,
    key: str,
    env: dict[str, str],
) -> list[DeliveryRun]:
    clear_outbox(engine)
    # URLs are set to the receiver's port before each run.
    subs = add_subscriptions(
        engine,
        key,
        [f"http://127.0.0.1:9/s/{i}" for i in range(1, args.delivery_subscriptions + 1)],
    )
    if args.prefill == "callbacks":
        prefill_callbacks(args, engine, url, tmp, secret, tag)
    else:
        prefill_sql(engine, args.events, tag)
    if args.due_together:
        reset_outbox(engine, due_together=True)
    vacuum_outbox(engine)
    with engine.connect() as conn:
        tasks = conn.execute(text("SELECT count(DISTINCT task_pk) FROM events")).scalar_one()
        types = dict(conn.execute(text("SELECT type, count(*) FROM events GROUP BY 1")).all())
    print(f"outbox: {outbox_counts(engine)} over {tasks} tasks; events by type {types}")
    runs = []
    for i, threads in enumerate(args.event_threads):
        if i:
            reset_outbox(engine, args.due_together)
        run = delivery_run(args, engine, db_url, tmp, threads, key, subs, env)
        runs.append(run)
        print(describe_delivery(run), flush=True)
    return runs


def describe_delivery(run: DeliveryRun) -> str:
    lo, med, hi = run.per_second
    out = [
        f"{run.processes} x manager worker --event-threads {run.threads}: "
        f"{run.delivered}/{run.sends} sends delivered "
        f"({run.events} events) in {run.seconds:.1f} s: {run.rate:.1f} deliveries/s "
        f"(= {run.rate / max(run.sends / max(run.events, 1), 1):.1f} events/s, each to "
        f"every subscription); steady {run.steady_rate:.1f}/s; database {run.db_rate:.1f}/s; "
        f"per second min/median/max {lo}/{med}/{hi}",
        f"    cpu/delivery: worker {run.cpu_worker_ms:.2f} ms, its PostgreSQL backends "
        f"{run.cpu_db_ms:.2f} ms, receiver {run.cpu_receiver_ms:.2f} ms; the worker "
        f"process{'es' if run.processes > 1 else ''} used {run.worker_cores * 100:.0f}% of a "
        f"core (a process's Python runs one thread at a time); machine "
        f"{run.machine_busy * 100:.0f}% busy ({os.cpu_count()} CPUs)",
    ]
    out += [f"    {note}" for note in run.notes]
    out += [f"    {name}: {'PASS' if ok else 'FAIL'}" for name, ok in run.checks.items()]
    return "\n".join(out)


def report_delivery(runs: list[DeliveryRun], args: argparse.Namespace) -> bool:
    print()
    print("== 2. delivery")
    ok_all = True
    for run in runs:
        ok_rate = run.rate >= TARGET_DELIVERY_RATE
        ok_checks = all(run.checks.values())
        ok_all = ok_all and ok_rate and ok_checks
        print(
            f"{run.processes} x manager worker --event-threads {run.threads}: "
            f"{run.rate:7.1f} deliveries/s "
            f"(steady {run.steady_rate:.1f}, database {run.db_rate:.1f}) over {run.sends} sends "
            f"to {args.delivery_subscriptions} subscriptions; cpu/delivery worker "
            f"{run.cpu_worker_ms:.2f} ms, PostgreSQL {run.cpu_db_ms:.2f} ms, receiver "
            f"{run.cpu_receiver_ms:.2f} ms"
        )
        print(
            f"    target >= {TARGET_DELIVERY_RATE:.0f}/s: {'PASS' if ok_rate else 'FAIL'}   "
            f"checks: {'PASS' if ok_checks else 'FAIL'}"
        )
    return ok_all


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--part", choices=("both", "ingest", "delivery"), default="both")
    g = p.add_argument_group("1. ingest")
    g.add_argument("--rounds", type=int, default=6, help="rounds of (a) and (b) runs")
    g.add_argument("--duration", type=int, default=8, help="seconds per measured run")
    g.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured (a), (b) first")
    g.add_argument("--subscriptions", type=int, default=2, help="subscriptions in (b) runs")
    g.add_argument("--connections", type=int, default=16, help="wrk -c")
    g.add_argument("--threads", type=int, default=2, help="wrk -t")
    g.add_argument("--workers", type=int, default=4, help="gunicorn workers of manager serve")
    g.add_argument(
        "--max-rate", type=int, default=4000, help="bodies generated per second of a run"
    )
    g = p.add_argument_group("2. delivery")
    g.add_argument("--events", type=int, default=20_000, help="events in the outbox at least")
    g.add_argument(
        "--prefill",
        choices=("callbacks", "sql"),
        default="callbacks",
        help="fill the outbox through manager serve, or by INSERTs",
    )
    g.add_argument(
        "--delivery-subscriptions", type=int, default=2, help="subscriptions taking every event"
    )
    g.add_argument(
        "--event-threads",
        default="32",
        help="comma-separated --event-threads of manager worker, one delivery run each",
    )
    g.add_argument(
        "--worker-option",
        action="append",
        default=[],
        help="one more argument for manager worker (repeat it)",
    )
    g.add_argument(
        "--due-together",
        action="store_true",
        help="every send due at one instant, as after `manager events replay`, instead of "
        "as written (one callback's events at a time)",
    )
    g.add_argument(
        "--py-spy",
        metavar="PATH",
        help="py-spy executable: profile the worker (--gil) during each run, print its top",
    )
    g.add_argument(
        "--worker-processes",
        type=int,
        default=1,
        help="manager worker processes sending the outbox side by side",
    )
    g.add_argument("--receiver-processes", type=int, default=2)
    g.add_argument("--delivery-timeout", type=float, default=600, help="seconds at most a run")
    p.add_argument(
        "--admin-url",
        default=os.environ.get(
            "BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL database to connect to for CREATE/DROP DATABASE",
    )
    p.add_argument("--keep-db", action="store_true", help="do not drop the database")
    p.add_argument("--keep-tmp", action="store_true", help="keep the logs under /tmp/bench_events")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--verbose", action="store_true", help="print wrk's own output too")
    args = p.parse_args(argv)
    args.event_threads = [int(x) for x in args.event_threads.split(",") if x.strip()]
    if args.connections % args.threads:
        p.error("--connections must be a multiple of --threads (wrk splits them evenly)")
    args.wrk = shutil.which("wrk")
    if args.wrk is None:
        p.error("wrk not found: apt-get install wrk")
    args.rate = 0  # bench/callbacks.py's run_wrk: closed loop
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secret = secrets.token_hex(16)
    tag = secrets.token_hex(3)
    key = new_key()
    print(
        f"{datetime.now():%Y-%m-%d %H:%M:%S}  part {args.part}; ingest: wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s, {args.rounds} rounds of (a) no "
        f"subscriptions and (b) {args.subscriptions}; manager serve -w {args.workers}; "
        f"delivery: {args.events}+ events to {args.delivery_subscriptions} subscriptions, "
        f"--event-threads {args.event_threads}; {os.cpu_count()} CPUs, load "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    TMP_ROOT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=TMP_ROOT))
    ok = True
    try:
        with bench_database(args.admin_url, args.keep_db, prefix="bench_events") as db_url:
            engine = create_engine(db_url)
            env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES}
            metrics = tmp / "metrics"
            metrics.mkdir()
            manager_env = env | {
                "DATABASE_URL": f"{db_url}?application_name={MANAGER_NAME}",
                "ZEGO_APP_ID": str(APP_ID),
                "ZEGO_CALLBACK_SECRET": secret,
                "SECRET_KEY": secrets.token_hex(16),
                "SUBSCRIPTION_KEY": key,
                "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            }
            port = free_port()
            log = tmp / "manager.log"
            server = start(
                [
                    str(VENV_BIN / "manager"),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(args.workers),
                ],
                manager_env,
                log,
            )
            try:
                base = f"http://127.0.0.1:{port}"
                wait_ready(f"{base}/readyz", server, log)
                url = f"{base}/callbacks/zego"
                probe = next(callback_bodies(secret, f"{tag}-probe", 1))
                status, answer = post(url, probe)
                if status != 200 or answer.get("verdict") != "applied":
                    raise RuntimeError(f"probe callback answered {status} {answer}")
                ingest_runs: list[IngestRun] = []
                delivery_runs: list[DeliveryRun] = []
                if args.part in ("both", "ingest"):
                    ingest_runs = ingest_part(args, engine, url, server, tmp, secret, tag, key)
                if args.part in ("both", "delivery"):
                    delivery_runs = delivery_part(
                        args, engine, db_url, url, tmp, secret, tag, key, env
                    )
            finally:
                stop(server)
                engine.dispose()
        if ingest_runs:
            ok = report_ingest(ingest_runs, args) and ok
        if delivery_runs:
            ok = report_delivery(delivery_runs, args) and ok
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
