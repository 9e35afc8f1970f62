"""Bulk stop of running tasks against the fake ZEGOCLOUD, with several workers.

    .venv/bin/python bench/stops.py [--tasks 1000] [--workers 2] [--rate-limit 100]

Creates a PostgreSQL database of its own (127.0.0.1:5432, user postgres), runs
the migrations, records N running tasks, starts `manager fake-zego` enforcing
the rate limit and `--workers` x `manager worker`, queues one bulk stop of all
running tasks, and waits until the fake has accepted every stop. Prints the
sustained stop rate (first to last call at the fake), throttled calls and the
most calls the fake saw in any one-second window, then cleans up.

Targets (issue 3): at least 95 stops/s sustained and zero throttled calls.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import bench_database, free_port  # noqa: E402  (bench/common.py)

from manager.db import make_engine  # noqa: E402
from manager.migrate import upgrade  # noqa: E402

BIN = Path(sys.executable).parent
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
APP_ID = 1357924680
SERVER_SECRET = secrets.token_hex(16)
CALLBACK_SECRET = secrets.token_hex(16)


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "manager"), *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process and the rest of its process group
    (a worker's sender process), from /proc."""
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


def seed_tasks(database_url: str, fake_url: str, count: int) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (app_id, task_id, owner, status, state_seq, state_rank, "
                "max_seq, owner_seq, owner_rank, runs, run_start_seen, started_at, "
                "first_seen_at, updated_at, last_delivery_at) "
                "SELECT :app, 'bench-' || g, 'owner-' || g, 'running', 1, 2, 1, 1, 2, 1, true, "
                "now(), now(), now(), now() FROM generate_series(1, :n) AS g"
            ),
            {"app": APP_ID, "n": count},
        )
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=4,
        help="sender threads per worker",
    )
    parser.add_argument("--rate-limit", type=int, default=100)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    processes: list[subprocess.Popen[bytes]] = []
    with bench_database(args.admin_url) as database_url:
        engine = make_engine(database_url)
        upgrade(engine)
        engine.dispose()
        fake_port = free_port()
        fake_url = f"http://127.0.0.1:{fake_port}/"
        env = {
            "DATABASE_URL": database_url,
            "ZEGO_APP_ID": str(APP_ID),
            "ZEGO_SERVER_SECRET": SERVER_SECRET,
            "ZEGO_CALLBACK_SECRET": CALLBACK_SECRET,
            "ZEGO_API_URL": fake_url,
            "ZEGO_RATE_LIMIT": str(args.rate_limit),
            "SECRET_KEY": "bench",
        }
        try:
            processes.append(
                spawn(
                    [
                        "fake-zego",
                        "--port",
                        str(fake_port),
                        "--callback-url",
                        "",
                        "--rate-limit",
                        str(args.rate_limit),
                    ],
                    env,
                )
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"{fake_url}_fake/stats", timeout=1)
                    break
                except requests.RequestException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            seed_tasks(database_url, fake_url, args.tasks)
            queue_bulk_stop(env)
            started = time.monotonic()
            worker = ["worker", "--threads", str(args.worker_threads)]
            processes += [spawn(worker, env) for _ in range(args.workers)]
            stats: dict[str, object] = {}
            # Worker CPU once stops flow, so that start-up (imports, the sender
            # processes) can be told apart from the cost of the stops themselves.
            flowing: tuple[int, float] | None = None
            while time.monotonic() - started < args.timeout:
                stats = requests.get(f"{fake_url}_fake/stats", timeout=5).json()
                accepted_now = int(stats["accepted_stops"])  # type: ignore[call-overload]
                if flowing is None and accepted_now > 0:
                    flowing = (accepted_now, sum(cpu_seconds(p.pid) for p in processes[1:]))
                if accepted_now >= args.tasks:
                    break
                time.sleep(0.25)
            wall = time.monotonic() - started
            cpu = {"fake": cpu_seconds(processes[0].pid)}
            cpu["workers"] = sum(cpu_seconds(p.pid) for p in processes[1:])
        finally:
            stop_all(processes)
    accepted = int(stats["accepted_stops"])  # type: ignore[call-overload]
    first, last = float(stats["first_call_at"]), float(stats["last_call_at"])  # type: ignore[arg-type]
    sustained = (accepted - 1) / (last - first) if last > first else 0.0
    print(
        json.dumps(
            {
                k: stats[k]
                for k in ("calls", "accepted_stops", "throttled", "max_calls_in_one_second")
            }
        )
    )
    print(
        f"tasks={args.tasks} workers={args.workers}x{args.worker_threads} threads "
        f"rate_limit={args.rate_limit}/s"
    )
    print(f"accepted stops      {accepted}")
    print(f"sustained rate      {sustained:.1f} stops/s (first to last call at the fake)")
    print(f"wall time           {wall:.1f} s (workers started to last stop seen)")
    print(f"throttled calls     {stats['throttled']}")
    print(f"max calls in 1 s    {stats['max_calls_in_one_second']}")
    per_stop = {k: 1000 * v / max(1, accepted) for k, v in cpu.items()}
    workers_ms, fake_ms = per_stop["workers"], per_stop["fake"]
    print(f"cpu per stop        workers {workers_ms:.1f} ms (with start-up), fake {fake_ms:.1f} ms")
    if flowing is not None and accepted > flowing[0]:
        steady_ms = 1000 * (cpu["workers"] - flowing[1]) / (accepted - flowing[0])
        print(f"                    workers {steady_ms:.1f} ms once stops flow")
    print(f"load average        {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ok = accepted == args.tasks and sustained >= 0.95 * args.rate_limit and stats["throttled"] == 0
    print(f"targets (>= {0.95 * args.rate_limit:.0f}/s, 0 throttled): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
