"""Time `manager rebuild` over a large synthetic history in PostgreSQL.

    .venv/bin/python bench/rebuild.py [--tasks 1000000] [--deliveries N] [--owners 20000]
                                      [--damage 0.1] [--keep | --reuse NAME]
    .venv/bin/python bench/rebuild.py --tasks 20000 --generate-only   # the history alone
    .venv/bin/python bench/rebuild.py --migrate-from 0012   # time migration 0013 too

What it does, all on 127.0.0.1 (PostgreSQL with trust auth, see --admin-url):

1. checks that `manager rebuild` exists, and stops with a message if it does not
   (--generate-only does not need it; --migrate-from then times the migration alone);
2. creates a fresh database (dropped at the end, even on error, unless --keep) and
   migrates it, then writes bench/reports.py's synthetic history (--tasks tasks, their
   runs, and --deliveries deliveries that are the runs' events, their resends and
   rejected requests, plus stop requests) and checks that its tasks and runs are what
   their events make them; or, with --reuse NAME, uses a database kept by
   `bench/reports.py --keep` or `bench/rebuild.py --keep`;
3. copies tasks and task_runs aside (what the events make them), then damages
   --damage of the tasks (a wrong status, start, owner or run count; runs missing or
   extra), so that the rebuild has something to write;
4. runs, as subprocesses of `.venv/bin/manager` with DATABASE_URL set, `rebuild
   --dry-run`, `rebuild`, and `rebuild --task` for the task with the most events, and
   prints for each its wall time, its CPU time, the CPU time of its PostgreSQL
   backends, its peak RSS, the rows of tasks and task_runs it changed (by checksum,
   before and after) and the last lines it printed;
5. compares tasks and task_runs with the copy: every column that differs, counted.
   After `rebuild` nothing should, outside what the rebuild does not own (max_seq,
   updated_at, first_seen_at, last_delivery_at, input and outputs are not in the fold).

With --migrate-from REVISION (e.g. 0012, the schema before tasks followed from their
events) the history is written at that revision, and `manager db upgrade` is timed
first: migration 0013 rebuilds every task as it changes the schema, in one transaction.

Target from the issue: `manager rebuild` of the 1,000,000-task history under 5 minutes
(held to the migration too).
With --reuse the database is left as the rebuild left it (the damage repaired, if the
rebuild is right); the copy is dropped either way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url, text

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from common import bench_database  # noqa: E402  (bench/common.py)
from reports import (  # noqa: E402  (bench/reports.py)
    check_history,
    describe_deliveries,
    generate,
    load_average,
    row_counts,
)

from manager.config import KNOWN_VARIABLES  # noqa: E402
from manager.db import make_engine  # noqa: E402
from manager.migrate import upgrade  # noqa: E402

MANAGER = Path(sys.executable).parent / "manager"  # see --manager
TARGET_SECONDS = 300.0
APP_NAME = "bench-rebuild"  # PostgreSQL application_name of the command's connections
SCHEMA = "bench_rebuild"  # where the copy of tasks and task_runs is kept meanwhile
POLL_SECONDS = 0.1
# Columns a rebuild does not recompute: registers outside the fold (SPEC 3.2 keeps them).
NOT_REBUILT = frozenset(
    {"max_seq", "updated_at", "first_seen_at", "last_delivery_at", "input", "outputs"}
)
# The columns of tasks that migration 0013 replaced (before it, after it).
SCHEMA_VARIANT = frozenset(
    {"run_floor_seq", "run_start_seq", "run_start_rank", "end_seq", "last_failure_at"}
    | {"run_start_seen"}
)

# Damage, by the task's id: every k-th task, one kind in turn (see damage()).
DAMAGE = [
    # 0: the status and end of a finished run lost, as if its stop had not come.
    """UPDATE tasks SET status = 'running', ended_at = NULL, stop_reason = NULL
       WHERE id % :k = 0 AND (id / :k) % 4 = 0 AND status IN ('stopped', 'failed')""",
    """UPDATE task_runs AS r SET ended_at = NULL, stop_reason = NULL FROM tasks AS t
       WHERE t.id = r.task_pk AND r.run_no = t.runs
           AND t.id % :k = 0 AND (t.id / :k) % 4 = 0""",
    # 1: the current run's start an hour early, in the task and its run.
    """UPDATE tasks SET started_at = started_at - interval '1 hour'
       WHERE id % :k = 0 AND (id / :k) % 4 = 1""",
    """UPDATE task_runs AS r SET started_at = r.started_at - interval '1 hour' FROM tasks AS t
       WHERE t.id = r.task_pk AND r.run_no = t.runs
           AND t.id % :k = 0 AND (t.id / :k) % 4 = 1""",
    # 2: every run lost.
    "DELETE FROM task_runs WHERE task_pk % :k = 0 AND (task_pk / :k) % 4 = 2",
    "UPDATE tasks SET runs = 0 WHERE id % :k = 0 AND (id / :k) % 4 = 2",
    # 3: another owner, and a run too many.
    """INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason)
       SELECT id, runs + 1, 'someone-else', started_at, ended_at, stop_reason FROM tasks
       WHERE id % :k = 0 AND (id / :k) % 4 = 3""",
    """UPDATE task_runs SET owner = 'someone-else'
       WHERE task_pk % :k = 0 AND (task_pk / :k) % 4 = 3""",
    """UPDATE tasks SET owner = 'someone-else', runs = runs + 1
       WHERE id % :k = 0 AND (id / :k) % 4 = 3""",
]


@dataclass(frozen=True)
class Measured:
    label: str
    returncode: int
    wall: float
    cpu: float  # the command's own user + system seconds
    db_cpu: float  # its PostgreSQL backends' (sampled every POLL_SECONDS; a lower bound)
    peak_rss_mb: float  # VmHWM, sampled every POLL_SECONDS
    tasks_changed: int
    runs_changed: int
    lines: int
    tail: list[str]


# --------------------------------------------------------------------------- the command


def command_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES}
    separator = "&" if "?" in url else "?"
    return env | {
        "DATABASE_URL": f"{url}{separator}application_name={APP_NAME}",
        "SECRET_KEY": secrets.token_hex(16),  # else it would be written to instance/
        "LOG_FORMAT": "text",
    }


def rebuild_missing() -> str | None:
    """Why `manager rebuild` cannot be run, or None when it can."""
    if not MANAGER.exists():
        return f"{MANAGER} not found (run `bash .ci/bootstrap` first)"
    out = subprocess.run(
        [str(MANAGER), "rebuild", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=command_env("sqlite://"),
    )
    if out.returncode != 0:
        said = (out.stderr or out.stdout).strip().splitlines()
        return (
            "`manager rebuild` is not available yet (`manager rebuild --help` exited "
            f"{out.returncode}: {said[-1] if said else 'no output'}); it is being written. "
            "Run with --generate-only to build and check the history alone."
        )
    for option in ("--dry-run", "--task"):
        if option not in out.stdout:
            return f"`manager rebuild --help` does not mention {option}:\n{out.stdout}"
    return None


def vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backends(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": APP_NAME},
            ).scalars()
        )


def run_command(engine: Engine, url: str, label: str, argv: list[str], tmp: Path) -> Measured:
    """Run `manager ARGV`, sampling its peak RSS and its backends' CPU as it goes."""
    before, columns = checksums(engine, across_migration=argv[:1] == ["db"])
    out_path = tmp / f"out-{secrets.token_hex(3)}.txt"
    db_cpu: dict[int, float] = {}  # each backend's CPU so far (its connection is new)
    peak_kb = 0
    with out_path.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [str(MANAGER), *argv], env=command_env(url), stdout=out, stderr=subprocess.STDOUT
        )
        next_backends = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - started
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid) or 0)
            now = time.perf_counter()
            if now >= next_backends:
                for backend in backends(engine):
                    if backend not in db_cpu and (cpu := proc_cpu(backend)) is not None:
                        db_cpu[backend] = cpu
                next_backends = now + 5 * POLL_SECONDS
            for backend in list(db_cpu):
                if (cpu := proc_cpu(backend)) is not None:
                    db_cpu[backend] = cpu
            time.sleep(POLL_SECONDS)
    if not peak_kb:  # gone before the first sample: ru_maxrss (see reports.peak_rss_kb)
        peak_kb = usage.ru_maxrss
    lines = out_path.read_text(errors="replace").splitlines()
    out_path.unlink()
    tasks_changed, runs_changed = changed_since(engine, before, columns)
    return Measured(
        label=label,
        returncode=proc.returncode,
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        db_cpu=sum(db_cpu.values()),
        peak_rss_mb=peak_kb / 1024,
        tasks_changed=tasks_changed,
        runs_changed=runs_changed,
        lines=len(lines),
        tail=lines[-4:],
    )


# --------------------------------------------------------------------------- the database


def task_columns(conn: Any, table: str = "tasks", schema: str = "public") -> list[str]:
    return list(
        conn.execute(
            text(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                ":schema AND table_name = :table ORDER BY ordinal_position"
            ),
            {"schema": schema, "table": table},
        ).scalars()
    )


def checksums(engine: Engine, across_migration: bool) -> tuple[str, list[str]]:
    """Each row's checksum, in tables of our schema; returns their names' suffix and the
    columns of tasks summed (across_migration: only those on both sides of 0013)."""
    suffix = secrets.token_hex(3)
    with engine.begin() as conn:
        columns = [
            c
            for c in task_columns(conn)
            if not (across_migration and c in SCHEMA_VARIANT) and c != "id"
        ]
        conn.execute(
            text(
                f"CREATE TABLE {SCHEMA}.tasks_{suffix} AS "  # noqa: S608 - our own names
                f"SELECT id, md5(({', '.join(columns)}, 0)::text) AS sum FROM tasks"
            )
        )
        conn.execute(
            text(
                f"CREATE TABLE {SCHEMA}.runs_{suffix} AS "  # noqa: S608 - our own names
                "SELECT task_pk, run_no, md5((r.owner, r.started_at, r.ended_at, "
                "r.stop_reason)::text) AS sum FROM task_runs AS r"
            )
        )
    return suffix, columns


def changed_since(engine: Engine, suffix: str, columns: list[str]) -> tuple[int, int]:
    """Rows of tasks and of task_runs that differ from the checksums (added or removed
    count too); the checksums are dropped."""
    with engine.begin() as conn:
        tasks_changed = conn.execute(
            text(
                f"""SELECT count(*) FROM tasks AS t
                    FULL JOIN {SCHEMA}.tasks_{suffix} AS s USING (id)
                    WHERE md5(({", ".join(f"t.{c}" for c in columns)}, 0)::text)
                        IS DISTINCT FROM s.sum"""  # noqa: S608
            )
        ).scalar_one()
        runs_changed = conn.execute(
            text(
                f"""SELECT count(*) FROM task_runs AS r
                    FULL JOIN {SCHEMA}.runs_{suffix} AS s USING (task_pk, run_no)
                    WHERE md5((r.owner, r.started_at, r.ended_at, r.stop_reason)::text)
                        IS DISTINCT FROM s.sum"""  # noqa: S608
            )
        ).scalar_one()
        conn.execute(text(f"DROP TABLE {SCHEMA}.tasks_{suffix}, {SCHEMA}.runs_{suffix}"))
    return tasks_changed, runs_changed


def keep_truth(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
        for copy, table in (("truth_tasks", "tasks"), ("truth_runs", "task_runs")):
            conn.execute(text(f"CREATE TABLE {SCHEMA}.{copy} AS TABLE {table}"))


def damage(engine: Engine, fraction: float) -> int:
    """Damage every k-th task (k = 1 / fraction); returns how many tasks that changed."""
    if fraction <= 0:
        return 0
    k = max(1, round(1 / fraction))
    with engine.begin() as conn:
        for statement in DAMAGE:
            conn.execute(text(statement), {"k": k})
        damaged = conn.execute(
            text(
                f"""SELECT count(*) FROM (
                        SELECT id FROM tasks AS t JOIN {SCHEMA}.truth_tasks AS s USING (id)
                        WHERE id % :k = 0 AND t::text <> s::text
                        UNION
                        SELECT task_pk FROM task_runs AS r
                        FULL JOIN {SCHEMA}.truth_runs AS s USING (task_pk, run_no)
                        WHERE task_pk % :k = 0 AND r::text IS DISTINCT FROM s::text
                    ) AS changed"""  # noqa: S608 - our own names
            ),
            {"k": k},
        ).scalar_one()
    return int(damaged)


def differences(engine: Engine) -> tuple[dict[str, int], dict[str, int]]:
    """Per column, the rows of tasks and of task_runs that differ from the copy."""
    with engine.connect() as conn:
        truth_columns = set(task_columns(conn, "truth_tasks", SCHEMA))
        columns = [c for c in task_columns(conn) if c != "id" and c in truth_columns]
        counts = ", ".join(
            f"count(*) FILTER (WHERE t.{c}::text IS DISTINCT FROM s.{c}::text)" for c in columns
        )
        row = conn.execute(
            text(
                f"SELECT count(*) FILTER (WHERE t.id IS NULL OR s.id IS NULL), {counts} "  # noqa: S608
                f"FROM tasks AS t FULL JOIN {SCHEMA}.truth_tasks AS s USING (id)"
            )
        ).one()
        tasks = {"(missing or extra)": row[0], **dict(zip(columns, row[1:], strict=True))}
        run_columns = ("owner", "started_at", "ended_at", "stop_reason")
        counts = ", ".join(
            f"count(*) FILTER (WHERE r.{c} IS DISTINCT FROM s.{c})" for c in run_columns
        )
        row = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE r.task_pk IS NULL), "  # noqa: S608
                f"count(*) FILTER (WHERE s.task_pk IS NULL), {counts} "
                f"FROM task_runs AS r FULL JOIN {SCHEMA}.truth_runs AS s USING (task_pk, run_no)"
            )
        ).one()
        runs = {
            "(missing)": row[0],
            "(extra)": row[1],
            **dict(zip(run_columns, row[2:], strict=True)),
        }
    return {k: n for k, n in tasks.items() if n}, {k: n for k, n in runs.items() if n}


def heaviest_task(engine: Engine) -> tuple[str, int]:
    with engine.connect() as conn:
        task_pk, task_id = conn.execute(
            text("SELECT id, task_id FROM tasks ORDER BY max_seq DESC, id LIMIT 1")
        ).one()
        events = conn.execute(
            text("SELECT count(*) FROM deliveries WHERE task_pk = :id AND event_key IS NOT NULL"),
            {"id": task_pk},
        ).scalar_one()
    return task_id, int(events)


# --------------------------------------------------------------------------- main


def describe(m: Measured) -> str:
    return (
        f"{m.label:28} exit {m.returncode}  wall {m.wall:7.1f} s  cpu {m.cpu:6.1f} s  "
        f"PostgreSQL cpu >= {m.db_cpu:6.1f} s  peak RSS {m.peak_rss_mb:6.1f} MB  "
        f"changed: {m.tasks_changed} tasks, {m.runs_changed} runs  ({m.lines} lines printed)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument(
        "--deliveries", type=int, help="deliveries in all (default: 3 per task, 3,000,000)"
    )
    parser.add_argument("--owners", type=int, default=20_000)
    parser.add_argument(
        "--damage",
        type=float,
        default=0.1,
        help="share of the tasks to damage before the rebuild (0: none, so that a right "
        "rebuild changes nothing)",
    )
    parser.add_argument(
        "--check-sample",
        type=int,
        default=500,
        metavar="N",
        help="check the generated history, folding N tasks (0: no checks)",
    )
    parser.add_argument(
        "--migrate-from",
        metavar="REVISION",
        help="write the history at this schema revision (e.g. 0012), then time `manager db "
        "upgrade` to head (whose migration 0013 rebuilds every task) before the rest",
    )
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", metavar="NAME", help="use a database kept by --keep")
    parser.add_argument(
        "--manager", type=Path, default=MANAGER, help=f"the console script to time ({MANAGER})"
    )
    parser.add_argument(
        "--generate-only",
        action="store_true",
        help="generate and check the history, run nothing (with --keep: for --reuse)",
    )
    args = parser.parse_args(argv)
    if args.deliveries is None:
        args.deliveries = 3 * args.tasks
    if args.reuse and (args.generate_only or args.migrate_from):
        parser.error("--generate-only and --migrate-from make a history; --reuse takes one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global MANAGER
    MANAGER = args.manager
    missing = None if args.generate_only else rebuild_missing()
    if missing and not args.migrate_from:
        print(f"bench/rebuild.py: {missing}", file=sys.stderr)
        return 2
    if missing:
        print(f"note: {missing}\nonly `manager db upgrade` is timed")

    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    with contextlib.ExitStack() as stack:
        if args.reuse:
            url = make_url(args.admin_url).set(drivername="postgresql+psycopg", database=args.reuse)
            url = url.render_as_string(hide_password=False)
        else:
            url = stack.enter_context(
                bench_database(args.admin_url, args.keep, prefix="manager_bench_rebuild")
            )
        engine = make_engine(url)
        stack.callback(engine.dispose)
        upgrade(engine, args.migrate_from or "head")
        if args.reuse:
            print(f"reusing {args.reuse}: {row_counts(engine)}")
        else:
            started = time.perf_counter()
            kinds = generate(engine, args.tasks, args.deliveries, args.owners, now)
            print(
                f"generated in {time.perf_counter() - started:.1f} s"
                + (f" at revision {args.migrate_from}" if args.migrate_from else "")
                + f": {row_counts(engine)}"
            )
            print(f"  deliveries: {describe_deliveries(engine, kinds)}")
            if args.check_sample:
                started = time.perf_counter()
                if not check_history(engine, args.check_sample):
                    print("the generated history disagrees with itself (see above)")
                    return 1
                print(f"  checked in {time.perf_counter() - started:.1f} s")
        if args.generate_only:
            return 0

        keep_truth(engine)
        with contextlib.ExitStack() as truth:
            truth.callback(drop_schema, engine)
            damaged = damage(engine, args.damage)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE tasks, task_runs"))
            print(f"damaged {damaged} tasks ({args.damage:.0%}); load average {load_average()}")
            heavy_id, heavy_events = heaviest_task(engine)
            commands = []
            if args.migrate_from:
                commands.append((f"db upgrade (from {args.migrate_from})", ["db", "upgrade"]))
            if not missing:
                commands += [
                    ("rebuild --dry-run", ["rebuild", "--dry-run"]),
                    ("rebuild", ["rebuild"]),
                    (f"rebuild --task ({heavy_events} ev)", ["rebuild", "--task", heavy_id]),
                ]
            results = []
            with tempfile.TemporaryDirectory(prefix="manager-bench-rebuild-") as tmp:
                for label, argv_ in commands:
                    m = run_command(engine, url, label, argv_, Path(tmp))
                    results.append(m)
                    print(describe(m), flush=True)
                    for line in m.tail:
                        print(f"    | {line[:200]}")
                    if m.returncode != 0:
                        break
            tasks_diff, runs_diff = differences(engine)
        print(f"load average after: {load_average()}")
        return report(results, damaged, tasks_diff, runs_diff)


def drop_schema(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))


def report(
    results: list[Measured], damaged: int, tasks_diff: dict[str, int], runs_diff: dict[str, int]
) -> int:
    """The verdicts: a dry run changes nothing, the rebuild (or the migration) leaves every
    task as its events make it, within the target time."""
    print()
    if any(m.returncode for m in results):
        print("FAIL: a command exited with an error (its last lines are above)")
        return 1
    by_label = {m.label.split(" (")[0]: m for m in results}
    ok = True
    dry = by_label.get("rebuild --dry-run")
    if dry is not None:
        ok &= dry.tasks_changed == dry.runs_changed == 0
        print(
            f"dry run changed {dry.tasks_changed} tasks and {dry.runs_changed} runs "
            f"({'PASS' if dry.tasks_changed == dry.runs_changed == 0 else 'FAIL'}: "
            f"should be none); {dry.wall:.1f} s"
        )
    wrong = {k: n for k, n in tasks_diff.items() if k not in NOT_REBUILT}
    ok &= not wrong and not runs_diff
    print(
        "at the end, tasks differing from what their events make them, by column: "
        f"{tasks_diff or 'none'}; runs: {runs_diff or 'none'} "
        f"({'PASS' if not wrong and not runs_diff else 'FAIL'}; {damaged} tasks were damaged; "
        f"not rebuilt, not held to it: {', '.join(sorted(NOT_REBUILT))})"
    )
    for label in ("db upgrade", "rebuild"):
        if (m := by_label.get(label)) is not None:
            fast = m.wall < TARGET_SECONDS
            ok &= fast
            print(
                f"target: {label} under {TARGET_SECONDS:.0f} s: {m.wall:.1f} s "
                f"({'PASS' if fast else 'FAIL'})"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
