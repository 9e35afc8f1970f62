"""Load the callback endpoint next to a one-INSERT Flask baseline, in the same run.

Run it from the repository root, with PostgreSQL up and wrk installed:

    .venv/bin/python bench/callbacks.py --threads 1 --connections 8
    .venv/bin/python bench/callbacks.py --threads 1 --connections 8 --held-rate 500
    .venv/bin/python bench/callbacks.py --check    # exit 1 when a target is missed
    .venv/bin/python bench/callbacks.py --history-tasks 1000000   # ingest over a history

Targets: manager's rate at least 0.8x the baseline's (TARGET_RATIO), and manager's
p99 latency under 25 ms (TARGET_P99_MS) at that load: the median p99 of the same
runs the rate comes from (4. below). Every manager response must be a 200 with
nothing rejected, or the run fails whatever the figures.

What it does, all on 127.0.0.1:

1. creates a fresh PostgreSQL database (dropped at the end, even on error);
2. starts `manager serve --workers 4` (which migrates first) and a baseline Flask app
   (bench/baseline_app.py: one INSERT of the raw body) under gunicorn with 4 workers.
   The baseline is a Flask view, as issue 2 defines it; manager's callback POSTs skip
   Flask's request handling (CallbackRoute, manager/web/callbacks.py), which saves
   about 0.2 ms of app CPU per callback here and is much of why manager comes close;
3. before every measured run, writes distinct signed callbacks (start, update and stop
   events of fresh tasks, each with its own Nonce), one file per wrk thread, so that no
   body is sent twice unless a thread runs out (the report says so if it happens);
4. runs `wrk --latency` with the same settings against baseline and manager, alternately
   (baseline, manager, baseline, manager, ...), and prints the median rates, the ratio,
   p99 latencies, CPU per request (app processes, their PostgreSQL backends, wrk),
   non-2xx counts and the verdicts recorded in the deliveries table;
5. then offers the baseline and manager, alternately, the same constant rate
   (--held-rate, by default 0.8x the baseline's median) for --held-rounds runs each:
   wrk with one connection per thread, each thread sending on a fixed schedule and
   timing each answer from the request's scheduled time, not from when it left
   (wrk_bodies.lua's @INTERVAL mode, as wrk2 does), so a request held up behind a
   slow one counts its wait and a backlog shows in p99. A diagnostic, not a target:
   on a 2-core machine that also runs PostgreSQL and 16 wrk threads, 0.8x of the
   baseline's closed-loop rate is close to what the baseline itself sustains open
   loop, and its own p99 there runs from under 25 ms to hundreds of ms from one run
   to the next; the baseline's figures at the same rate are printed beside
   manager's to show it (--no-held-baseline leaves them out).

With --history-tasks N, a second database gets bench/reports.py's synthetic history of N
tasks (its `generate`: their runs, 3 deliveries per task that are the runs' events,
resends and rejected requests, stop requests; about 2 minutes for a million tasks) and
a second manager (`history`, same workers) serves it; every round then runs baseline,
manager (the empty database) and history in turn (history before manager every other
round), and the report adds the ratio of
history's median rate to manager's (target >= TARGET_HISTORY_RATIO: a large history
costs ingest little). The two managers' runs alternate, so the machine's drift falls on
both alike; the paired ratio sets each history run against the manager run next to it.

Both apps share the machine with PostgreSQL and wrk, so the figures move with whatever
else runs: run each configuration at least twice, and compare medians along with the
load average the report prints. Needs wrk (`apt-get install wrk`) and PostgreSQL with
trust auth (see --admin-url, or BENCH_ADMIN_URL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from common import bench_database, free_port  # bench/common.py, beside this script
from sqlalchemy import Engine, create_engine, text

from manager.config import KNOWN_VARIABLES
from manager.migrate import upgrade
from manager.zego.signing import new_nonce, signed_callback

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent
LUA_SCRIPT = BENCH_DIR / "wrk_bodies.lua"

APP_ID = 1234567
TARGET_RATIO = 0.8
TARGET_P99_MS = 25.0
TARGET_HISTORY_RATIO = 0.9  # manager's rate over a large history / on an empty database
# Tasks per block: a block is all their starts, then all their updates, then all their
# stops, so a task's later events are sent long after its earlier ones.
BLOCK = 64
# PostgreSQL application_name of each app's connections, to tell their backends apart.
APP_NAMES = {"baseline": "bench-baseline", "manager": "bench-manager", "history": "bench-history"}
# The targets that are manager: on an empty database, and over a history (--history-tasks).
MANAGERS = {"manager", "history"}
BASELINE_DDL = (
    "CREATE TABLE IF NOT EXISTS baseline_bodies ("
    " id BIGSERIAL PRIMARY KEY,"
    " received_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),"
    " raw_body BYTEA NOT NULL)"
)


@dataclass(frozen=True)
class WrkResult:
    target: str
    rate: float
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    bodies: int
    wraps: int
    # CPU milliseconds per completed request: gunicorn master + workers, the PostgreSQL
    # backends serving that app, and wrk itself (NaN where /proc is not available).
    cpu_app_ms: float = math.nan
    cpu_db_ms: float = math.nan
    cpu_wrk_ms: float = math.nan


@dataclass(frozen=True)
class HeldResult:
    """An open-loop run: requests sent on a fixed schedule, whatever the answers."""

    target: str
    offered: float  # req/s asked for
    rate: float  # answers per second over the run
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    cpu_app_ms: float = math.nan
    cpu_db_ms: float = math.nan
    cpu_client_ms: float = math.nan  # wrk's


# --------------------------------------------------------------------------- database


def verdict_counts(engine: Engine) -> dict[str, int]:
    """Deliveries by verdict (and reason, when there is one)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT verdict, reason, count(*) FROM deliveries GROUP BY verdict, reason")
        ).all()
    return {(f"{v}/{r}" if r else v): int(n) for v, r, n in rows}


def count_rows(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())  # noqa: S608


def backend_cpu(engine: Engine, application_name: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected as `application_name`."""
    with engine.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
            {"name": application_name},
        ).scalars()
        return {pid: cpu for pid in pids if (cpu := proc_cpu(pid)) is not None}


# The counters of how manager applied its callbacks, and their label: folds (extend: from
# the task's row, refold: from its whole history), or the fast and locked paths of the
# PostgreSQL function that came before them.
APPLY_COUNTERS = {"manager_callback_folds_total": "kind", "manager_callback_paths_total": "path"}


def callback_paths(metrics_url: str) -> dict[str, int]:
    """How manager applied the callbacks (APPLY_COUNTERS), summed over the workers."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 - 127.0.0.1 only
        text_ = response.read().decode()
    paths: dict[str, int] = {}
    for line in text_.splitlines():
        name, brace, rest = line.partition("{")
        if brace and name in APPLY_COUNTERS and f'{APPLY_COUNTERS[name]}="' in rest:
            labels, value = line.rsplit(" ", 1)
            path = labels.split(f'{APPLY_COUNTERS[name]}="', 1)[1].split('"', 1)[0]
            paths[path] = paths.get(path, 0) + int(float(value))
    return paths


def diff_counts(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in sorted(after.items()) if n - before.get(k, 0)}


def fill_history(url: str, tasks: int) -> Engine:
    """Migrate the database at `url` and write bench/reports.py's history into it."""
    from reports import describe_deliveries, generate, row_counts  # bench/reports.py

    history = create_engine(url)
    upgrade(history)
    started = time.perf_counter()
    kinds = generate(
        history, tasks, 3 * tasks, 20_000, datetime.now(UTC).replace(tzinfo=None), APP_ID
    )
    print(
        f"history of {tasks} tasks written in {time.perf_counter() - started:.0f} s: "
        f"{row_counts(history)}; deliveries: {describe_deliveries(history, kinds)}",
        flush=True,
    )
    return history


# --------------------------------------------------------------------------- processes


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `cmd` in a process group of its own, output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone in 20 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def proc_cpu(pid: int) -> float | None:
    """utime + stime of one process in seconds, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """CPU seconds so far of the live processes in process group `pgid`."""
    total = 0.0
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({proc.returncode}); see\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - 127.0.0.1 only
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s; see\n{log.read_text()}")


def post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(  # noqa: S310 - 127.0.0.1 only
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# --------------------------------------------------------------------------- bodies


def callback_bodies(secret: str, tag: str, count: int) -> Iterator[bytes]:
    """`count` distinct signed callbacks: per block of tasks, starts, updates, then stops."""
    now = int(time.time())
    sent = 0
    block = 0
    while sent < count:
        tasks = [f"bench-{tag}-b{block}-{i}" for i in range(BLOCK)]
        for event, status, sequence in (
            ("transcode_start", "TranscodeStarted", 1),
            ("transcode_start", "TranscodeUpdated", 2),
            ("transcode_stop", "TranscodeStopped", 3),
        ):
            for i, task_id in enumerate(tasks):
                if sent == count:
                    return
                payload: dict[str, object] = {
                    "Event": event,
                    "Appid": str(APP_ID),
                    "TaskId": task_id,
                    # A task's owner is the same in all its callbacks, as with ZEGOCLOUD.
                    "UserId": f"user-{(block * BLOCK + i) % 97}",
                    "Sequence": sequence,
                    "Status": status,
                }
                if event == "transcode_start":
                    payload["Details"] = {
                        "Input": {"StreamId": f"in-{task_id}"},
                        "Outputs": [{"StreamId": f"out-{task_id}", "Width": 1280, "Height": 720}],
                    }
                else:
                    payload["StopReason"] = 0
                body = signed_callback(secret, payload, now, new_nonce())
                yield json.dumps(body, separators=(",", ":")).encode()
                sent += 1
        block += 1


def write_bodies(prefix: Path, threads: int, per_thread: int, secret: str, tag: str) -> None:
    """One file per wrk thread (PREFIX.0, PREFIX.1, ...), each with its own tasks."""
    for tid in range(threads):
        lines = callback_bodies(secret, f"{tag}-w{tid}", per_thread)
        Path(f"{prefix}.{tid}").write_bytes(b"\n".join(lines) + b"\n")


# --------------------------------------------------------------------------- wrk


def run_wrk(
    target: str, url: str, prefix: Path, args: argparse.Namespace, duration: int
) -> WrkResult:
    cmd = [
        args.wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(prefix),
    ]
    if args.rate:
        # Each connection waits connections/rate seconds before each request, so the
        # offered load stays at or under --rate in total.
        cmd.append(f"{1000 * args.connections / args.rate:.3f}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if not lines:
        raise RuntimeError(f"no BENCH_RESULT in wrk output:\n{out.stdout}\n{out.stderr}")
    if args.verbose:
        print(out.stdout.rstrip())
    r = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    return WrkResult(
        target=target,
        rate=r["requests"] / (r["duration_us"] / 1e6),
        requests=r["requests"],
        p50_ms=r["p50_us"] / 1000,
        p90_ms=r["p90_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        max_ms=r["lat_max_us"] / 1000,
        non_2xx=r["errors_status"],
        socket_errors=r["errors_connect"]
        + r["errors_read"]
        + r["errors_write"]
        + r["errors_timeout"],
        bodies=r["bodies"],
        wraps=r["wraps"],
    )


def describe(r: WrkResult) -> str:
    return (
        f"{r.target:8} {r.rate:8.1f} req/s  n={r.requests:<6} p50={r.p50_ms:6.2f} ms "
        f"p90={r.p90_ms:6.2f} ms  p99={r.p99_ms:6.2f} ms  max={r.max_ms:7.2f} ms  "
        f"non-2xx={r.non_2xx}  socket-errors={r.socket_errors}"
        + f"  cpu/req app={r.cpu_app_ms:.2f} db={r.cpu_db_ms:.2f} wrk={r.cpu_wrk_ms:.2f} ms"
        + (f"  REPEATED BODIES (wrapped {r.wraps}x over {r.bodies})" if r.wraps else "")
    )


# --------------------------------------------------------------------------- open loop


def run_wrk_paced(
    target: str, url: str, prefix: Path, args: argparse.Namespace, rate: float
) -> HeldResult:
    """wrk with one connection per thread, each sending on a fixed schedule (the @INTERVAL
    mode of wrk_bodies.lua): latencies count from the scheduled time of each request."""
    n = args.held_connections
    cmd = [
        args.wrk,
        f"-t{n}",
        f"-c{n}",
        f"-d{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(prefix),
        f"@{1000 * n / rate:.4f}",
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.duration + 60, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    if args.verbose:
        print(out.stdout.rstrip())
    found = {}
    for line in out.stdout.splitlines():
        key, _, rest = line.partition(" ")
        if key in ("BENCH_RESULT", "BENCH_PACED"):
            found[key] = json.loads(rest)
    if len(found) != 2:
        raise RuntimeError(f"no BENCH_PACED in wrk output:\n{out.stdout}\n{out.stderr}")
    r, paced = found["BENCH_RESULT"], found["BENCH_PACED"]
    return HeldResult(
        target=target,
        offered=rate,
        rate=paced["answers"] / (r["duration_us"] / 1e6),
        requests=paced["answers"],
        p50_ms=paced["p50_ms"],
        p90_ms=paced["p90_ms"],
        p99_ms=paced["p99_ms"],
        max_ms=paced["max_ms"],
        non_2xx=paced["non_2xx"],
        socket_errors=r["errors_connect"]
        + r["errors_read"]
        + r["errors_write"]
        + r["errors_timeout"],
    )


def describe_held(r: HeldResult) -> str:
    return (
        f"{r.target:8} offered {r.offered:7.1f} req/s, answered {r.rate:7.1f} req/s  "
        f"n={r.requests:<6} p50={r.p50_ms:6.2f} ms p90={r.p90_ms:6.2f} ms  "
        f"p99={r.p99_ms:6.2f} ms  max={r.max_ms:7.2f} ms  non-2xx={r.non_2xx}  "
        f"socket-errors={r.socket_errors}  cpu/req app={r.cpu_app_ms:.2f} "
        f"db={r.cpu_db_ms:.2f} wrk={r.cpu_client_ms:.2f} ms"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--connections", type=int, default=16, help="wrk -c (same for both)")
    p.add_argument("--threads", type=int, default=2, help="wrk -t (same for both)")
    p.add_argument("--rounds", type=int, default=5, help="baseline+manager pairs to run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured load first")
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        help="hold the load at or under this many req/s (wrk delay()); 0: as fast as possible",
    )
    p.add_argument(
        "--held-rounds",
        type=int,
        default=2,
        help="open-loop runs of manager at --held-rate after the others (0: none)",
    )
    p.add_argument(
        "--held-rate",
        type=float,
        default=0,
        help=f"req/s of the open-loop runs; 0: {TARGET_RATIO}x the baseline's median rate",
    )
    p.add_argument(
        "--held-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer the baseline the same open-loop rate too, before each manager run",
    )
    p.add_argument(
        "--held-connections",
        type=int,
        default=16,
        help="connections (one per wrk thread) of the open-loop runs",
    )
    p.add_argument("--workers", type=int, default=4, help="gunicorn workers for both apps")
    p.add_argument(
        "--max-rate",
        type=int,
        default=4000,
        help="bodies generated per second of run (raise it if the report says REPEATED)",
    )
    p.add_argument(
        "--admin-url",
        default=os.environ.get(
            "BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="PostgreSQL database to connect to for CREATE/DROP DATABASE",
    )
    p.add_argument("--keep-db", action="store_true", help="do not drop the database")
    p.add_argument(
        "--history-tasks",
        type=int,
        default=0,
        metavar="N",
        help="also run manager on a second database holding a history of N tasks "
        "(bench/reports.py's generator, 3 deliveries per task), every round, and compare",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--verbose", action="store_true", help="print wrk's own output too")
    args = p.parse_args(argv)
    if args.connections % args.threads:
        p.error("--connections must be a multiple of --threads (wrk splits them evenly)")
    args.wrk = shutil.which("wrk")
    if args.wrk is None:
        p.error("wrk not found: apt-get install wrk")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secret = secrets.token_hex(16)
    tag = secrets.token_hex(3)
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency"
        + (f" at <= {args.rate:g} req/s" if args.rate else "")
        + "; "
        f"{args.rounds} rounds of baseline then manager"
        + (f" then history ({args.history_tasks} tasks)" if args.history_tasks else "")
        + f"; gunicorn -w {args.workers} for each; "
        f"{os.cpu_count()} CPUs, load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    with (
        bench_database(args.admin_url, args.keep_db) as db_url,
        tempfile.TemporaryDirectory(prefix="manager-bench-") as tmp_name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmp_name)
        engine = create_engine(db_url)
        engines = {"baseline": engine, "manager": engine}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with engine.begin() as conn:
                conn.execute(text(BASELINE_DDL))
            if args.history_tasks:
                history_url = stack.enter_context(
                    bench_database(args.admin_url, args.keep_db, prefix="manager_bench_history")
                )
                engines["history"] = fill_history(history_url, args.history_tasks)

            env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES}
            metrics_dir = tmp / "metrics"
            metrics_dir.mkdir()
            manager_env = env | {
                "DATABASE_URL": f"{db_url}?application_name={APP_NAMES['manager']}",
                "ZEGO_APP_ID": str(APP_ID),
                "ZEGO_CALLBACK_SECRET": secret,
                "SECRET_KEY": secrets.token_hex(16),
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            }
            manager_port, baseline_port = free_port(), free_port()
            manager_log, baseline_log = tmp / "manager.log", tmp / "baseline.log"
            procs.append(
                start(
                    [
                        str(VENV_BIN / "manager"),
                        "serve",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(manager_port),
                        "--workers",
                        str(args.workers),
                    ],
                    manager_env,
                    manager_log,
                )
            )
            procs.append(
                start(
                    [
                        str(VENV_BIN / "gunicorn"),
                        "-w",
                        str(args.workers),
                        "-b",
                        f"127.0.0.1:{baseline_port}",
                        "--chdir",
                        str(BENCH_DIR),
                        "baseline_app:app",
                    ],
                    env
                    | {"BENCH_DATABASE_URL": f"{db_url}?application_name={APP_NAMES['baseline']}"},
                    baseline_log,
                )
            )
            servers = {"manager": procs[0], "baseline": procs[1]}
            if args.history_tasks:
                history_port = free_port()
                history_metrics = tmp / "history-metrics"
                history_metrics.mkdir()
                history_env = manager_env | {
                    "DATABASE_URL": f"{history_url}?application_name={APP_NAMES['history']}",
                    "PROMETHEUS_MULTIPROC_DIR": str(history_metrics),
                }
                servers["history"] = start(
                    [
                        str(VENV_BIN / "manager"),
                        "serve",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(history_port),
                        "--workers",
                        str(args.workers),
                    ],
                    history_env,
                    tmp / "history.log",
                )
                procs.append(servers["history"])
            manager_base = f"http://127.0.0.1:{manager_port}"
            baseline_base = f"http://127.0.0.1:{baseline_port}"
            wait_ready(f"{manager_base}/readyz", procs[0], manager_log)
            wait_ready(f"{baseline_base}/healthz", procs[1], baseline_log)
            urls = {
                "baseline": f"{baseline_base}/ingest",
                "manager": f"{manager_base}/callbacks/zego",
            }
            if args.history_tasks:
                history_base = f"http://127.0.0.1:{history_port}"
                wait_ready(f"{history_base}/readyz", servers["history"], tmp / "history.log")
                urls["history"] = f"{history_base}/callbacks/zego"

            # One request by hand: the signing is right and the verdict is "applied".
            for target in MANAGERS & urls.keys():
                probe = next(callback_bodies(secret, f"{tag}-probe-{target}", 1))
                status, answer = post(urls[target], probe)
                if status != 200 or answer.get("verdict") != "applied":
                    raise RuntimeError(f"{target}: probe callback answered {status} {answer}")

            per_thread = max(BLOCK * 3, args.max_rate * args.duration // args.threads)
            run_no = 0

            def measure(target: str, duration: int) -> WrkResult:
                nonlocal run_no
                run_no += 1
                prefix = tmp / f"bodies-{run_no}"
                write_bodies(prefix, args.threads, per_thread, secret, f"{tag}-r{run_no}")
                proc = servers[target]
                app_name = APP_NAMES[target]
                have_proc = Path("/proc/self/stat").exists()
                app0, db0, wrk0 = 0.0, dict[int, float](), children_cpu()
                if have_proc:
                    app0, db0 = group_cpu(proc.pid), backend_cpu(engine, app_name)
                result = run_wrk(target, urls[target], prefix, args, duration)
                if have_proc and result.requests:
                    db1 = backend_cpu(engine, app_name)
                    db = sum(cpu - db0.get(pid, 0.0) for pid, cpu in db1.items())
                    result = replace(
                        result,
                        cpu_app_ms=(group_cpu(proc.pid) - app0) * 1000 / result.requests,
                        cpu_db_ms=db * 1000 / result.requests,
                        cpu_wrk_ms=(children_cpu() - wrk0) * 1000 / result.requests,
                    )
                for tid in range(args.threads):
                    Path(f"{prefix}.{tid}").unlink()
                return result

            if args.warmup:
                for target in urls:
                    measure(target, args.warmup)
                time.sleep(0.5)

            def announce(line: str, target: str, before: dict[str, int]) -> None:
                """A run's line, with the load and, for manager, the verdicts it recorded."""
                extra = ""
                if target in MANAGERS:
                    extra = f"  verdicts={diff_counts(verdict_counts(engines[target]), before)}"
                load = "/".join(f"{x:.1f}" for x in os.getloadavg())
                print(f"{line}  load={load}{extra}", flush=True)

            results: dict[str, list[WrkResult]] = {target: [] for target in urls}
            verdicts_before = {t: verdict_counts(engines[t]) for t in MANAGERS & urls.keys()}
            baseline_rows_before = count_rows(engine, "baseline_bodies")
            for round_no in range(1, args.rounds + 1):
                # baseline, manager, history; every other round history before manager,
                # so that neither always follows the other.
                order = list(urls)
                if round_no % 2 == 0 and "history" in urls:
                    order = ["baseline", "history", "manager"]
                for target in order:
                    before = verdict_counts(engines[target])
                    r = measure(target, args.duration)
                    time.sleep(0.5)  # let requests cut off by wrk's stop finish
                    results[target].append(r)
                    announce(f"round {round_no} {describe(r)}", target, before)
            held: dict[str, list[HeldResult]] = {"baseline": [], "manager": []}

            def measure_held(target: str, rate: float) -> HeldResult:
                nonlocal run_no
                run_no += 1
                prefix = tmp / f"bodies-{run_no}"
                n = args.held_connections
                count = round(rate * args.duration)
                write_bodies(prefix, n, count // n + BLOCK, secret, f"{tag}-h{run_no}")
                proc = servers[target]
                app0, db0 = group_cpu(proc.pid), backend_cpu(engine, APP_NAMES[target])
                wrk0 = children_cpu()
                h = run_wrk_paced(target, urls[target], prefix, args, rate)
                db1 = backend_cpu(engine, APP_NAMES[target])
                db = sum(cpu - db0.get(pid, 0.0) for pid, cpu in db1.items())
                h = replace(
                    h,
                    cpu_app_ms=(group_cpu(proc.pid) - app0) * 1000 / h.requests,
                    cpu_db_ms=db * 1000 / h.requests,
                    cpu_client_ms=(children_cpu() - wrk0) * 1000 / h.requests,
                )
                for tid in range(n):
                    Path(f"{prefix}.{tid}").unlink()
                return h

            if args.held_rounds:
                base_rate = statistics.median(r.rate for r in results["baseline"])
                rate = args.held_rate or TARGET_RATIO * base_rate
                # The baseline at the same offered rate, first: the control that shows
                # what this machine and harness give at that load with one INSERT.
                targets = ("baseline", "manager") if args.held_baseline else ("manager",)
                for round_no in range(1, args.held_rounds + 1):
                    for target in targets:
                        before = verdict_counts(engine)
                        h = measure_held(target, rate)
                        held[target].append(h)
                        announce(f"held {round_no} {describe_held(h)}", target, before)
                        time.sleep(0.5)
            verdicts = diff_counts(verdict_counts(engine), verdicts_before["manager"])
            history_verdicts: dict[str, int] = {}
            history_paths: dict[str, int] = {}
            if "history" in engines:
                history_verdicts = diff_counts(
                    verdict_counts(engines["history"]), verdicts_before["history"]
                )
            baseline_rows = count_rows(engine, "baseline_bodies") - baseline_rows_before
            paths = callback_paths(f"{manager_base}/metrics")
            if args.history_tasks:
                history_paths = callback_paths(f"{history_base}/metrics")
        finally:
            for proc in reversed(procs):
                stop(proc)
            for each in set(engines.values()):
                each.dispose()

        code = report(results, held, verdicts, baseline_rows, paths, args)
        if "history" in results:
            code = max(code, report_history(results, history_verdicts, history_paths, args))
        return code


def report(
    results: dict[str, list[WrkResult]],
    held_by_target: dict[str, list[HeldResult]],
    verdicts: dict[str, int],
    baseline_rows: int,
    paths: dict[str, int],
    args: argparse.Namespace,
) -> int:
    base, mgr = results["baseline"], results["manager"]
    held = held_by_target["manager"]
    base_rate = statistics.median(r.rate for r in base)
    mgr_rate = statistics.median(r.rate for r in mgr)
    base_p99 = statistics.median(r.p99_ms for r in base)
    mgr_p99 = statistics.median(r.p99_ms for r in mgr)
    ratio = mgr_rate / base_rate if base_rate else 0.0

    def cpu(rs: list[WrkResult]) -> str:
        app = statistics.median(r.cpu_app_ms for r in rs)
        db = statistics.median(r.cpu_db_ms for r in rs)
        return f"cpu/request: app {app:.2f} ms, PostgreSQL backends {db:.2f} ms"

    mgr_non_2xx = sum(r.non_2xx + r.socket_errors for r in mgr) + sum(
        h.non_2xx + h.socket_errors for h in held
    )
    base_non_2xx = sum(r.non_2xx + r.socket_errors for r in base)
    rejected = sum(n for k, n in verdicts.items() if k.startswith("rejected"))
    repeated = any(r.wraps for r in base + mgr)
    manager_requests = sum(r.requests for r in mgr) + sum(h.requests for h in held)

    print()
    print(
        f"baseline  median {base_rate:8.1f} req/s   median p99 {base_p99:6.2f} ms   "
        f"non-2xx/errors {base_non_2xx}   rows inserted {baseline_rows}   {cpu(base)}"
    )
    print(
        f"manager   median {mgr_rate:8.1f} req/s   median p99 {mgr_p99:6.2f} ms   "
        f"non-2xx/errors {mgr_non_2xx}   {cpu(mgr)}"
    )
    print(f"ratio     manager/baseline = {ratio:.3f}  (target >= {TARGET_RATIO})")
    # Each manager run against the baseline runs on either side of it: the machine's
    # speed drifts between runs, and a neighbouring pair shares most of the drift.
    paired = [
        m.rate / statistics.mean(b.rate for b in base[i : i + 2] if b.rate)
        for i, m in enumerate(mgr)
        if any(b.rate for b in base[i : i + 2])
    ]
    if len(paired) > 1:
        print(
            f"paired    manager run / its neighbouring baseline runs: median "
            f"{statistics.median(paired):.3f}, from {min(paired):.3f} to {max(paired):.3f}"
        )
    for target, runs in held_by_target.items():
        if not runs:
            continue
        p99 = statistics.median(h.p99_ms for h in runs)
        print(
            f"held      {target:8} at {runs[0].offered:.1f} req/s, open loop: answered "
            f"{statistics.median(h.rate for h in runs):7.1f} req/s   median p50 "
            f"{statistics.median(h.p50_ms for h in runs):6.2f} ms   median p99 {p99:6.2f} ms   "
            f"cpu/request: app {statistics.median(h.cpu_app_ms for h in runs):.2f} ms, "
            f"PostgreSQL backends {statistics.median(h.cpu_db_ms for h in runs):.2f} ms"
        )
    print(
        f"deliveries recorded in measured runs: {sum(verdicts.values())} "
        f"(wrk counted {manager_requests} responses; requests in flight when wrk stops "
        f"are recorded but not counted) {verdicts}"
    )
    print(
        f"how manager applied them (whole run, warm-up included): {paths} "
        "(extend: from the task's row; refold: from the task's whole history)"
    )
    if repeated:
        print(
            "note: some bodies were sent more than once (a thread ran out); "
            "re-deliveries are valid but become duplicates; raise --max-rate"
        )
    if args.rate:
        print(
            f"note: both targets were held to <= {args.rate:g} req/s, so the ratio only shows "
            "whether manager kept up; run without --rate to compare capacity"
        )
    ok_ratio = ratio >= TARGET_RATIO
    # "p99 under 25 ms at that load": in the runs that measured the ratio.
    ok_p99 = mgr_p99 < TARGET_P99_MS
    p99_where = f"at {mgr_rate:.0f} req/s"
    ok_clean = mgr_non_2xx == 0 and rejected == 0
    print(
        f"target ratio >= {TARGET_RATIO}: {'PASS' if ok_ratio else 'FAIL'}   "
        f"target p99 < {TARGET_P99_MS:.0f} ms {p99_where}: {'PASS' if ok_p99 else 'FAIL'}   "
        f"all 200 and none rejected: {'PASS' if ok_clean else 'FAIL'}"
    )
    if not ok_clean:
        return 1
    if args.check and not (ok_ratio and ok_p99):
        return 1
    return 0


def report_history(
    results: dict[str, list[WrkResult]],
    verdicts: dict[str, int],
    applied_by: dict[str, int],
    args: argparse.Namespace,
) -> int:
    """manager over a history against manager on an empty database, the same rounds."""
    empty, history = results["manager"], results["history"]
    empty_rate = statistics.median(r.rate for r in empty)
    history_rate = statistics.median(r.rate for r in history)
    ratio = history_rate / empty_rate if empty_rate else 0.0
    # Each history run against the empty-database run next to it, in its round (after
    # it or before it, in turn).
    paired = [h.rate / m.rate for h, m in zip(history, empty, strict=True) if m.rate]
    non_2xx = sum(r.non_2xx + r.socket_errors for r in history)
    rejected = sum(n for k, n in verdicts.items() if k.startswith("rejected"))
    print(
        f"history   median {history_rate:8.1f} req/s   median p99 "
        f"{statistics.median(r.p99_ms for r in history):6.2f} ms   non-2xx/errors {non_2xx}   "
        f"cpu/request: app {statistics.median(r.cpu_app_ms for r in history):.2f} ms, "
        f"PostgreSQL backends {statistics.median(r.cpu_db_ms for r in history):.2f} ms   "
        f"({args.history_tasks} tasks stored before)"
    )
    print(
        f"history   deliveries recorded in measured runs: {verdicts}; applied by (whole run, "
        f"warm-up included): {applied_by}"
    )
    print(
        f"ratio     history/empty = {ratio:.3f}"
        + (
            f"  (paired: median {statistics.median(paired):.3f}, from {min(paired):.3f} "
            f"to {max(paired):.3f})"
            if paired
            else ""
        )
    )
    ok_ratio = ratio >= TARGET_HISTORY_RATIO
    ok_clean = non_2xx == 0 and rejected == 0
    print(
        f"target history/empty >= {TARGET_HISTORY_RATIO}: {'PASS' if ok_ratio else 'FAIL'}   "
        f"history: all 200 and none rejected: {'PASS' if ok_clean else 'FAIL'}"
    )
    if not ok_clean:
        return 1
    return 1 if args.check and not ok_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
