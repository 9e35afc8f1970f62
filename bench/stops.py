"""Bulk stop of running tasks against the fake ZEGOCLOUD, with several workers.

    .venv/bin/python bench/stops.py [--tasks 1000] [--workers 2] [--worker-threads 64]
        [--rate-limit 100] [--db-rtt-ms 0] [--zego-delay-ms 0] [--zego-rtt-ms 0]
        [--target 95]
    .venv/bin/python bench/stops.py --matrix [--worker-threads 64]

Creates a PostgreSQL database of its own (127.0.0.1:5432, user postgres), runs
the migrations, records N running tasks, starts `manager fake-zego` enforcing
the rate limit and `--workers` x `manager worker --threads T`, queues one bulk
stop of all running tasks, and waits until the fake has accepted every stop.
Prints the sustained stop rate (first to last call at the fake), throttled calls,
the most calls the fake saw in any one-second window and duplicate sends, then
cleans up.

Distance: `--db-rtt-ms N` puts PostgreSQL N ms (a round trip) away from the
workers and from the app process that queues the bulk stop, through a user-space
delaying proxy (tests/delay_proxy.py) running in this process; seeding and the
final checks go direct. `--zego-delay-ms M` makes the fake answer each call M ms
after counting and applying it; `--zego-rtt-ms R` puts the fake R ms away too.

Duplicates: every task must be stopped exactly once. Counted are accepted stops
beyond the first for a task, plus calls the fake refused that were not throttled
(in this run only a re-send of a stop already applied is refused).

Each worker's stderr goes to /tmp/bench-stops-logs/<case>/worker-<i>.log (with
level names); the count of WARNING and ERROR lines is printed per case.

`--matrix` runs the three cases of issue 12 one after another, each in a fresh
database, 1000 tasks and 2 workers each, and prints a markdown table. Targets
(issue 12), with 0 throttled calls and 0 duplicates in every run:

    PostgreSQL  2 ms away, ZEGOCLOUD answering at once:     >= 95 stops/s
    PostgreSQL 25 ms away, ZEGOCLOUD answering in 500 ms:   >= 90 stops/s
    PostgreSQL 50 ms away, ZEGOCLOUD answering at once:     >= 85 stops/s

The exit code is 0 only if every case run passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypedDict

import requests
from sqlalchemy import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import bench_database, free_port, insert_running_tasks  # noqa: E402  (bench/common.py)

from manager.db import make_engine  # noqa: E402
from manager.migrate import upgrade  # noqa: E402
from tests.delay_proxy import DelayProxy  # noqa: E402

BIN = Path(sys.executable).parent
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LOG_ROOT = Path("/tmp/bench-stops-logs")
APP_ID = 1357924680
SERVER_SECRET = secrets.token_hex(16)
CALLBACK_SECRET = secrets.token_hex(16)
LEVEL_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")


@dataclass(frozen=True)
class Case:
    """One benchmark run: how far the services are and what it must reach."""

    db_rtt_ms: float = 0.0
    zego_delay_ms: int = 0
    zego_rtt_ms: float = 0.0
    tasks: int = 1000
    workers: int = 2
    worker_threads: int = 64
    rate_limit: int = 100
    target: float = 95.0
    timeout: float = 120.0

    @property
    def name(self) -> str:
        return (
            f"db{self.db_rtt_ms:g}ms-zego{self.zego_delay_ms}ms-zrtt{self.zego_rtt_ms:g}ms-"
            f"{self.tasks}t-{self.workers}w{self.worker_threads}"
        )


# Issue 12: (PostgreSQL round trip ms, ZEGOCLOUD answer delay ms, stops/s target).
MATRIX: tuple[tuple[float, int, float], ...] = ((2, 0, 95), (25, 500, 90), (50, 0, 85))


class Result(TypedDict):
    case: Case
    calls: int
    accepted: int
    throttled: int
    max_in_one_second: int
    sustained: float
    wall: float
    duplicate_accepts: int
    refused_resends: int
    duplicates: int
    all_accepted: bool
    cpu: dict[str, float]
    steady_worker_ms: float | None
    log_dir: Path
    log_counts: dict[str, dict[str, int]]
    workers_exited: list[int]
    passed: bool


def spawn(
    args: list[str], env: dict[str, str], stderr: IO[bytes] | None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "manager"), *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=stderr if stderr is not None else subprocess.DEVNULL,
        start_new_session=True,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process and the rest of its process group, from /proc."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pid:  # process group: spawn() starts a session per process
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def seed_tasks(database_url: str, fake_url: str, count: int) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        insert_running_tasks(conn, APP_ID, count, "'bench-' || g")
    engine.dispose()
    tasks = [
        {"task_id": f"bench-{i}", "owner": f"owner-{i}", "sequence": 1} for i in range(1, count + 1)
    ]
    response = requests.post(
        f"{fake_url}_fake/tasks", json={"tasks": tasks, "notify": False}, timeout=60
    )
    response.raise_for_status()


def queue_bulk_stop(env: dict[str, str]) -> None:
    token = subprocess.run(
        [str(BIN / "manager"), "tokens", "create", "bench"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    from manager import create_app, dispose_engines

    os.environ.update(env)
    app = create_app()
    response = app.test_client().post(
        "/api/stops",
        json={"all_running": True, "reason": "bench"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 202, response.json
    dispose_engines(app)


def via_proxy(url: str, rtt_ms: float, stack: contextlib.ExitStack) -> str:
    """`url` as seen through a DelayProxy costing `rtt_ms` a round trip (unchanged if 0).

    The proxy runs in this process until `stack` closes."""
    if rtt_ms <= 0:
        return url
    parsed = make_url(url)
    if parsed.drivername.startswith("postgresql"):
        target = (parsed.host or "127.0.0.1", parsed.port or 5432)
        proxy = stack.enter_context(DelayProxy(target, rtt_ms / 2000))
        return parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    proxy = stack.enter_context(DelayProxy((host, int(port)), rtt_ms / 2000))
    return f"http://127.0.0.1:{proxy.port}/"


def start_fake(
    case: Case, env: dict[str, str], log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], str]:
    """`manager fake-zego` on a free port, once it answers; (process, its direct URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = ["fake-zego", "--port", str(port), "--callback-url", ""]
    args += ["--rate-limit", str(case.rate_limit), "--answer-delay-ms", str(case.zego_delay_ms)]
    process = spawn(args, env, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{url}_fake/stats", timeout=1)
            return process, url
        except requests.RequestException:
            if time.monotonic() > deadline or process.poll() is not None:
                stop_all([process])
                raise
            time.sleep(0.1)


def watch(
    case: Case, fake_url: str, workers: list[subprocess.Popen[bytes]]
) -> tuple[dict[str, Any], float, tuple[int, float] | None]:
    """Poll the fake until every stop is accepted, the timeout passes or a worker dies.

    Returns the last stats, the wall time and (accepted, worker CPU) when stops
    began to flow, so that start-up can be told apart from the cost of the stops."""
    started = time.monotonic()
    stats: dict[str, Any] = {}
    flowing: tuple[int, float] | None = None
    while time.monotonic() - started < case.timeout:
        stats = requests.get(f"{fake_url}_fake/stats", timeout=5).json()
        accepted = int(stats["accepted_stops"])
        if flowing is None and accepted > 0:
            flowing = (accepted, sum(cpu_seconds(p.pid) for p in workers))
        if accepted >= case.tasks or any(p.poll() is not None for p in workers):
            break
        time.sleep(0.25)
    return stats, time.monotonic() - started, flowing


def count_levels(log_dir: Path) -> dict[str, dict[str, int]]:
    """WARNING/ERROR/CRITICAL lines in each worker log of a case."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(log_dir.glob("worker-*.log")):
        found = {"WARNING": 0, "ERROR": 0, "CRITICAL": 0}
        for line in path.read_text(errors="replace").splitlines():
            if match := LEVEL_LINE.search(line):
                found[match.group(1)] += 1
        counts[path.name] = found
    return counts


def run_case(case: Case, admin_url: str) -> Result:
    """One run in a fresh database; the proxies and processes live only as long as it."""
    log_dir = LOG_ROOT / case.name
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    with bench_database(admin_url) as database_url, contextlib.ExitStack() as stack:
        upgrade(engine := make_engine(database_url))
        engine.dispose()
        env = {
            "ZEGO_APP_ID": str(APP_ID),
            "ZEGO_SERVER_SECRET": SERVER_SECRET,
            "ZEGO_CALLBACK_SECRET": CALLBACK_SECRET,
            "ZEGO_RATE_LIMIT": str(case.rate_limit),
            "SECRET_KEY": "bench",
            "DATABASE_URL": database_url,
        }
        fake_log = stack.enter_context((log_dir / "fake.log").open("wb"))
        fake, fake_url = start_fake(case, env, fake_log)
        processes.append(fake)
        try:
            env["DATABASE_URL"] = via_proxy(database_url, case.db_rtt_ms, stack)
            env["ZEGO_API_URL"] = via_proxy(fake_url, case.zego_rtt_ms, stack)
            seed_tasks(database_url, fake_url, case.tasks)
            queue_bulk_stop(env)
            worker = ["worker", "--threads", str(case.worker_threads)]
            logs = [
                stack.enter_context((log_dir / f"worker-{i}.log").open("wb"))
                for i in range(1, case.workers + 1)
            ]
            workers = [spawn(worker, env, log) for log in logs]
            processes += workers
            stats, wall, flowing = watch(case, fake_url, workers)
            time.sleep(1.0)  # late re-sends would show up as duplicates
            settled: dict[str, Any] = requests.get(f"{fake_url}_fake/stats", timeout=5).json()
            cpu = {"fake": cpu_seconds(fake.pid)}
            cpu["workers"] = sum(cpu_seconds(p.pid) for p in workers)
            exited = [p.returncode for p in workers if p.poll() is not None]
        finally:
            stop_all(processes)
    return summarize(case, stats, settled, wall, flowing, cpu, log_dir, exited)


def summarize(
    case: Case,
    stats: dict[str, Any],
    settled: dict[str, Any],
    wall: float,
    flowing: tuple[int, float] | None,
    cpu: dict[str, float],
    log_dir: Path,
    exited: list[int],
) -> Result:
    """The figures of one run: rate from the stats when the last stop was accepted,
    duplicates from the stats a second later."""
    accepted = int(stats["accepted_stops"])
    first, last = stats["first_call_at"], stats["last_call_at"]
    sustained = (accepted - 1) / (last - first) if first is not None and last > first else 0.0
    stops: dict[str, list[int]] = settled["stops"]
    duplicate_accepts = sum(len(v) - 1 for v in stops.values())
    refused = int(settled["calls"]) - int(settled["throttled"]) - int(settled["accepted_stops"])
    all_accepted = (
        len(stops) == case.tasks
        and all(len(v) == 1 for v in stops.values())
        and int(settled["accepted_stops"]) == case.tasks
        and settled["running"] == []
    )
    steady = None
    if flowing is not None and accepted > flowing[0]:
        steady = 1000 * (cpu["workers"] - flowing[1]) / (accepted - flowing[0])
    duplicates = duplicate_accepts + refused
    throttled = int(settled["throttled"])
    return Result(
        case=case,
        calls=int(settled["calls"]),
        accepted=int(settled["accepted_stops"]),
        throttled=throttled,
        max_in_one_second=int(settled["max_calls_in_one_second"]),
        sustained=sustained,
        wall=wall,
        duplicate_accepts=duplicate_accepts,
        refused_resends=refused,
        duplicates=duplicates,
        all_accepted=all_accepted,
        cpu=cpu,
        steady_worker_ms=steady,
        log_dir=log_dir,
        log_counts=count_levels(log_dir),
        workers_exited=exited,
        passed=sustained >= case.target and throttled == 0 and duplicates == 0 and all_accepted,
    )


def print_result(result: Result) -> None:
    case, accepted = result["case"], max(1, result["accepted"])
    figures = {"calls": result["calls"], "accepted_stops": result["accepted"]}
    figures |= {"throttled": result["throttled"], "max_in_1s": result["max_in_one_second"]}
    print(json.dumps(figures))
    print(
        f"tasks={case.tasks} workers={case.workers}x{case.worker_threads} threads "
        f"rate_limit={case.rate_limit}/s"
    )
    print(f"database rtt        {case.db_rtt_ms:g} ms (through a delaying proxy)")
    print(f"zego answer delay   {case.zego_delay_ms} ms, zego rtt {case.zego_rtt_ms:g} ms")
    print(f"accepted stops      {result['accepted']} (all accepted once: {result['all_accepted']})")
    print(f"sustained rate      {result['sustained']:.1f} stops/s (first to last call at the fake)")
    print(f"wall time           {result['wall']:.1f} s (workers started to last stop seen)")
    print(f"throttled calls     {result['throttled']}")
    print(f"max calls in 1 s    {result['max_in_one_second']}")
    print(
        f"duplicates          {result['duplicates']} ({result['duplicate_accepts']} accepted "
        f"twice, {result['refused_resends']} refused re-sends)"
    )
    cpu = {k: 1000 * v / accepted for k, v in result["cpu"].items()}
    print(
        f"cpu per stop        workers {cpu['workers']:.1f} ms (with start-up), "
        f"fake {cpu['fake']:.1f} ms"
    )
    if result["steady_worker_ms"] is not None:
        print(f"                    workers {result['steady_worker_ms']:.1f} ms once stops flow")
    print(f"load average        {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if result["workers_exited"]:
        print(f"workers exited early with codes {result['workers_exited']}")
    print(f"logs                {result['log_dir']}/")
    for name, found in result["log_counts"].items():
        errors = found["ERROR"] + found["CRITICAL"]
        print(f"  {name:<17} {found['WARNING']} WARNING, {errors} ERROR")
    verdict = "PASS" if result["passed"] else "FAIL"
    print(f"target (>= {case.target:g}/s, 0 throttled, 0 duplicates, all accepted): {verdict}")


def print_table(results: list[Result]) -> None:
    print(
        "| db rtt ms | zego delay ms | tasks | workers | sustained stops/s | throttled "
        "| duplicates | max in 1 s | target | result |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    for r in results:
        c = r["case"]
        print(
            f"| {c.db_rtt_ms:g} | {c.zego_delay_ms} | {c.tasks} | {c.workers} "
            f"| {r['sustained']:.1f} | {r['throttled']} | {r['duplicates']} "
            f"| {r['max_in_one_second']} | >= {c.target:g} | {'PASS' if r['passed'] else 'FAIL'} |"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--worker-threads", type=int, default=64, help="calls in flight at once per worker"
    )
    parser.add_argument("--rate-limit", type=int, default=100)
    parser.add_argument("--db-rtt-ms", type=float, default=0.0, help="PostgreSQL round trip")
    parser.add_argument("--zego-delay-ms", type=int, default=0, help="fake answers this late")
    parser.add_argument("--zego-rtt-ms", type=float, default=0.0, help="fake's round trip")
    parser.add_argument("--target", type=float, default=95.0, help="stops/s to reach")
    parser.add_argument("--matrix", action="store_true", help="run the three cases of issue 12")
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--timeout", type=float, default=120.0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    base = Case(
        db_rtt_ms=args.db_rtt_ms,
        zego_delay_ms=args.zego_delay_ms,
        zego_rtt_ms=args.zego_rtt_ms,
        tasks=args.tasks,
        workers=args.workers,
        worker_threads=args.worker_threads,
        rate_limit=args.rate_limit,
        target=args.target,
        timeout=args.timeout,
    )
    if not args.matrix:
        result = run_case(base, args.admin_url)
        print_result(result)
        return 0 if result["passed"] else 1
    results: list[Result] = []
    for db_rtt, zego_delay, target in MATRIX:
        case = replace(
            base, db_rtt_ms=db_rtt, zego_delay_ms=zego_delay, zego_rtt_ms=0.0, tasks=1000
        )
        case = replace(case, workers=2, target=target)
        print(f"== case {case.name}", flush=True)
        results.append(run_case(case, args.admin_url))
        print_result(results[-1])
        print(flush=True)
    print_table(results)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
