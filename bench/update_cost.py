"""What a task's 1,000th update costs next to its 1st, one callback at a time.

    .venv/bin/python bench/update_cost.py [--updates 1000] [--repeat 5] [--others 2]
                                          [--sqlite] [--no-postgres]

Target from the issue: the 1,000th update costs no more than twice the first.

All in this process, on a fresh PostgreSQL database (migrated, dropped at the end) and,
with --sqlite, on a fresh SQLite file: the app as tests/conftest.py makes it
(manager.create_app with the callback secret and AppId set), called as gunicorn calls
it, through its WSGI callable (CallbackRoute and the callback endpoint; no HTTP, no
test client). Each task gets TranscodeStarted Sequence 1, then TranscodeUpdated
Sequence 2, 3, ... (--updates of them), each signed with its own Nonce, and before
each of its deliveries --others deliveries of other tasks (a pool of --pool tasks in
turn, each a start and then updates), so that its rows are not always the ones last
touched. Tasks follow one another, each begun while the one before ends: the new
task's first 50 updates are sent one for one with the old task's last 50, so both
windows of a pair are measured at the same moments, and whatever the machine or the
database does meanwhile (a 2-core machine shared with others; PostgreSQL's commits
took 4 ms, then 0.9 ms, within one run here) falls on both alike. Bodies are signed
and WSGI environs built before the timed calls; around each call of a task's own
deliveries, time.perf_counter (wall) and time.process_time (this process's CPU: the
app's Python; PostgreSQL's backend works in another process, inside the wall time)
are read. Every answer must be a 200 `applied`.

Printed per pair and over all pairs' samples together: the median wall and CPU time
per delivery of updates 1-50, of the middle 50 (wall) and of the last 50 (951-1000),
and the ratio last/first, which the target holds to 2 (wall and CPU alike).

--after-failure first gives each task a run that ZEGOCLOUD ended on its own
(TranscodeStarted, then a stop with StopReason 1), then its start and updates: a task
with such a stop is one whose every later event refolds its whole history (see
manager/callbacks/rules.py, `extend`), the case where an update's cost can grow.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from common import bench_database  # bench/common.py, beside this script
from flask import Flask
from werkzeug.test import EnvironBuilder

from manager import create_app, dispose_engines
from manager.config import Settings
from manager.db import make_engine
from manager.migrate import upgrade
from manager.zego.signing import new_nonce, signed_callback

APP_ID = 1234567
SECRET = secrets.token_hex(16)  # the callback secret of this run
WINDOW = 50
TARGET_RATIO = 2.0


@dataclass
class Tracked:
    """A task whose own deliveries are timed: wall and CPU ms by update number (1 = Seq 2)."""

    task_id: str
    wall_ms: dict[int, float] = field(default_factory=dict)
    cpu_ms: dict[int, float] = field(default_factory=dict)

    def median(self, first: int, last: int) -> tuple[float, float]:
        numbers = range(first, last + 1)
        return (
            statistics.median(self.wall_ms[n] for n in numbers),
            statistics.median(self.cpu_ms[n] for n in numbers),
        )


def body(
    task_id: str, sequence: int, user: str, *, status: str | None = None, ago: int = 0
) -> bytes:
    """A signed callback: TranscodeStarted for Sequence 1, else TranscodeUpdated, unless
    `status` says (TranscodeStopped: a stop with StopReason 1); `ago` seconds old."""
    payload: dict[str, object] = {
        "Event": "transcode_start",
        "Appid": str(APP_ID),
        "TaskId": task_id,
        "UserId": user,
        "Sequence": sequence,
        "Status": status or ("TranscodeStarted" if sequence == 1 else "TranscodeUpdated"),
        "Details": {
            "Input": {"StreamId": f"in-{task_id}"},
            "Outputs": [{"StreamId": f"out-{task_id}", "Width": 1280, "Height": 720}],
        },
    }
    if status == "TranscodeStopped":
        payload.update(Event="transcode_stop", StopReason=1)
        del payload["Details"]
    signed = signed_callback(SECRET, payload, int(time.time()) - ago, new_nonce())
    return json.dumps(signed, separators=(",", ":")).encode()


def prelude(task_id: str) -> list[bytes]:
    """--after-failure: a first run, ended by ZEGOCLOUD on its own (StopReason 1)."""
    return [
        body(task_id, 1, "owner", ago=20),
        body(task_id, 2, "owner", status="TranscodeStopped", ago=10),
    ]


def environ(raw: bytes) -> dict[str, Any]:
    builder = EnvironBuilder(
        path="/callbacks/zego",
        method="POST",
        data=raw,
        content_type="application/json",
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    try:
        return builder.get_environ()
    finally:
        builder.close()


class Others:
    """Deliveries of other tasks: a pool of tasks in turn, each a start, then updates."""

    def __init__(self, tag: str, pool: int) -> None:
        self.tasks = [f"other-{tag}-{i}" for i in range(pool)]
        self.sequences = [0] * pool
        self.turn = 0

    def next(self) -> bytes:
        i = self.turn % len(self.tasks)
        self.turn += 1
        self.sequences[i] += 1
        return body(self.tasks[i], self.sequences[i], f"user-{i % 97}")


def call(app: Flask, env: dict[str, Any]) -> tuple[str, bytes]:
    status: list[str] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> None:
        status.append(line)

    answer = b"".join(app(env, start_response))
    return status[0], answer


def check(status: str, answer: bytes, what: str) -> None:
    if not status.startswith("200") or json.loads(answer).get("verdict") != "applied":
        raise RuntimeError(f"{what}: answered {status} {answer!r}")


def plan(tasks: list[Tracked], updates: int) -> list[tuple[Tracked, int]]:
    """(task, Sequence) in the order they are sent. Each task but the first has its first
    WINDOW updates interleaved, one for one, with the previous task's last WINDOW, so
    that both windows are measured at the same moments: whatever the machine or the
    database does meanwhile falls on both alike."""
    first, *rest = tasks
    steps = [(first, seq) for seq in range(1, updates - WINDOW + 2)]  # start, updates
    for old, new in zip(tasks, rest, strict=False):
        steps.append((new, 1))
        for k in range(WINDOW):
            steps += [(old, updates - WINDOW + 2 + k), (new, 2 + k)]
        if new is not tasks[-1]:
            steps += [(new, seq) for seq in range(WINDOW + 2, updates - WINDOW + 2)]
    return steps


def run(app: Flask, args: argparse.Namespace, others: Others, tasks: list[Tracked]) -> None:
    """Send the plan, each of the tasks' deliveries after --others other ones, timing the
    tasks' own. Bodies are built in chunks just before they are sent: a Timestamp may be
    at most CALLBACK_MAX_AGE old when it arrives."""
    steps = plan(tasks, args.updates)
    # With --after-failure each task's own Sequences follow its failed run's two.
    shift = 2 if args.after_failure else 0
    for offset in range(0, len(steps), 200):
        chunk = [
            (
                [environ(others.next()) for _ in range(args.others)]
                + [environ(raw) for raw in (prelude(task.task_id) if seq == 1 and shift else [])],
                task,
                seq,
                environ(
                    body(
                        task.task_id,
                        seq + shift,
                        "owner",
                        status="TranscodeStarted" if seq == 1 else None,
                    )
                ),
            )
            for task, seq in steps[offset : offset + 200]
        ]
        for before, task, seq, env in chunk:
            for other in before:
                check(*call(app, other), "another task's delivery")
            started, started_cpu = time.perf_counter(), time.process_time()
            status, answer = call(app, env)
            elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
            check(status, answer, f"{task.task_id} Sequence {seq}")
            if seq > 1:  # the start is not an update
                task.wall_ms[seq - 1] = elapsed * 1000
                task.cpu_ms[seq - 1] = elapsed_cpu * 1000


@contextlib.contextmanager
def database(kind: str, admin_url: str) -> Iterator[str]:
    if kind == "postgresql":
        with bench_database(admin_url, prefix="manager_bench_update_cost") as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="manager-bench-update-cost-") as tmp:
        yield f"sqlite:///{tmp}/manager.db"


def measure(kind: str, args: argparse.Namespace) -> list[Tracked]:
    with database(kind, args.admin_url) as url:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        app = create_app(
            Settings(
                database_url=url,
                secret_key=secrets.token_hex(16),
                zego_app_id=APP_ID,
                callback_secrets=(SECRET,),
            )
        )
        tag = secrets.token_hex(3)
        tasks = [Tracked(f"bench-{tag}-{n}") for n in range(args.repeat + 1)]
        try:
            others = Others(tag, args.pool)
            for _ in range(args.warmup):
                check(*call(app, environ(others.next())), "warm-up")
            gc.collect()
            run(app, args, others, tasks)
        finally:
            dispose_engines(app)
    return tasks


def summary(kind: str, tasks: list[Tracked], updates: int) -> bool:
    """Per pair (a task's last WINDOW updates, the next task's first WINDOW, interleaved),
    then over all pairs' samples together."""
    head = (1, WINDOW)
    tail = (updates - WINDOW + 1, updates)
    middle = ((updates - WINDOW) // 2 + 1, (updates - WINDOW) // 2 + WINDOW)
    ratios = []
    for number, (old, new) in enumerate(zip(tasks, tasks[1:], strict=False), start=1):
        (old_wall, old_cpu), (new_wall, new_cpu) = old.median(*tail), new.median(*head)
        ratios.append(old_wall / new_wall)
        print(
            f"{kind:10} pair {number}: updates {head[0]}-{head[1]} wall {new_wall:6.3f} ms "
            f"cpu {new_cpu:6.3f} ms; {middle[0]}-{middle[1]} wall "
            f"{old.median(*middle)[0]:6.3f} ms; {tail[0]}-{tail[1]} wall {old_wall:6.3f} ms "
            f"cpu {old_cpu:6.3f} ms; last/first: wall {old_wall / new_wall:.2f} "
            f"cpu {old_cpu / new_cpu:.2f}"
        )

    def pooled(group: list[Tracked], span: tuple[int, int], samples: str) -> float:
        numbers = range(span[0], span[1] + 1)
        return statistics.median(getattr(t, samples)[n] for t in group for n in numbers)

    firsts, lasts = tasks[1:], tasks[:-1]
    wall_head, wall_tail = pooled(firsts, head, "wall_ms"), pooled(lasts, tail, "wall_ms")
    cpu_head, cpu_tail = pooled(firsts, head, "cpu_ms"), pooled(lasts, tail, "cpu_ms")
    ratio_wall, ratio_cpu = wall_tail / wall_head, cpu_tail / cpu_head
    ok = ratio_wall <= TARGET_RATIO and ratio_cpu <= TARGET_RATIO
    print(
        f"{kind:10} all {len(ratios)} pairs: updates {head[0]}-{head[1]} wall "
        f"{wall_head:.3f} ms cpu {cpu_head:.3f} ms; {middle[0]}-{middle[1]} wall "
        f"{pooled(lasts, middle, 'wall_ms'):.3f} ms; {tail[0]}-{tail[1]} wall "
        f"{wall_tail:.3f} ms cpu {cpu_tail:.3f} ms"
    )
    print(
        f"{kind:10} update {tail[0]}-{tail[1]} / update {head[0]}-{head[1]}: wall "
        f"{ratio_wall:.2f} (pairs from {min(ratios):.2f} to {max(ratios):.2f}), "
        f"cpu {ratio_cpu:.2f}   target <= {TARGET_RATIO:g}: {'PASS' if ok else 'FAIL'}"
    )
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=1000, help="updates of each task")
    p.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="pairs: tasks, one after another, each begun while the one before ends",
    )
    p.add_argument(
        "--others", type=int, default=2, help="other tasks' deliveries before each of its own"
    )
    p.add_argument("--pool", type=int, default=200, help="the other tasks, in turn")
    p.add_argument("--warmup", type=int, default=300, help="other deliveries first, untimed")
    p.add_argument("--sqlite", action="store_true", help="SQLite too, after PostgreSQL")
    p.add_argument(
        "--after-failure",
        action="store_true",
        help="give each task first a run that ZEGOCLOUD ended itself (StopReason 1): "
        "the tasks whose later events are placed by refolding their whole history",
    )
    p.add_argument("--no-postgres", dest="postgres", action="store_false")
    p.add_argument(
        "--admin-url",
        default=os.environ.get(
            "BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL database to connect to for CREATE/DROP DATABASE",
    )
    args = p.parse_args(argv)
    if args.updates < 2 * WINDOW:
        p.error(f"--updates must be at least {2 * WINDOW}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = (["postgresql"] if args.postgres else []) + (["sqlite"] if args.sqlite else [])
    print(
        f"{args.repeat} pairs of tasks of 1 start + {args.updates} updates, {args.others} "
        f"other deliveries before each; {os.cpu_count()} CPUs, load average "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    ok = True
    results = {kind: measure(kind, args) for kind in kinds}
    print()
    for kind, reps in results.items():
        ok &= summary(kind, reps, args.updates)
    print(f"load average after: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
