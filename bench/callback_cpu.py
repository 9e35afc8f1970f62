"""CPU per callback, in one process: manager's WSGI app (or the baseline's) and its
PostgreSQL backend, without gunicorn, wrk or other requests in between.

    .venv/bin/python bench/callback_cpu.py               # manager
    .venv/bin/python bench/callback_cpu.py --baseline    # bench/baseline_app.py
    .venv/bin/python bench/callback_cpu.py --profile     # manager, cProfile on CPU time

Sends the same kind of signed callbacks as bench/callbacks.py (starts, updates and
stops of fresh tasks), one at a time, straight into the WSGI callable, and prints the
process's CPU time and its PostgreSQL backend's (from /proc) per request. CPU time,
unlike a rate, hardly moves with other load on the machine, so an A/B comparison of
two commits holds up on a busy machine; bench/callbacks.py remains the measure of the
targets. Needs PostgreSQL with trust auth (--admin-url) and Linux's /proc.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

from callbacks import APP_ID, BASELINE_DDL, callback_bodies  # bench/, beside this script
from common import bench_database
from sqlalchemy import Engine, create_engine, text

SECRET = secrets.token_hex(16)  # signs the generated callbacks; never leaves the run
WARMUP = 300


def backend_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def environ(path: str, body: bytes) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def manager_app(url: str) -> tuple[Callable[..., Any], str, Engine]:
    os.environ.update(
        DATABASE_URL=url,
        ZEGO_APP_ID=str(APP_ID),
        ZEGO_CALLBACK_SECRET=SECRET,
        SECRET_KEY="bench-" + "k" * 26,
    )
    from manager import create_app
    from manager.migrate import upgrade

    app = create_app()
    upgrade(app.extensions["manager.engine"])
    # The pool the callbacks use first: its one connection's backend is the one to watch.
    engine = app.extensions.get("manager.autocommit_engine", app.extensions["manager.engine"])
    return app, "/callbacks/zego", engine


def baseline_app(url: str) -> tuple[Callable[..., Any], str, Engine]:
    setup = create_engine(url)
    with setup.begin() as conn:
        conn.execute(text(BASELINE_DDL))
    setup.dispose()
    os.environ["BENCH_DATABASE_URL"] = url
    import baseline_app as baseline

    return baseline.app, "/ingest", baseline.engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=6000)
    parser.add_argument("--baseline", action="store_true", help="the one-INSERT baseline app")
    parser.add_argument("--profile", action="store_true", help="cProfile, on CPU time")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()

    with bench_database(args.admin_url) as url:
        app, path, engine = (baseline_app if args.baseline else manager_app)(url)
        bodies = list(callback_bodies(SECRET, "cpu", args.requests + WARMUP))

        def call(body: bytes) -> None:
            status: list[str] = []
            chunks = app(environ(path, body), lambda s, _h, _e=None: status.append(s))
            out = b"".join(chunks)
            if not status[0].startswith("200"):
                raise RuntimeError(f"{status[0]}: {out!r}")

        for body in bodies[:WARMUP]:
            call(body)
        with engine.connect() as conn:  # the pooled connection every request gets
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        profile = cProfile.Profile(time.process_time) if args.profile else None
        db0, app0 = backend_cpu(pid), time.process_time()
        if profile:
            profile.enable()
        for body in bodies[WARMUP:]:
            call(body)
        if profile:
            profile.disable()
        app_ms = (time.process_time() - app0) * 1000 / args.requests
        db_ms = (backend_cpu(pid) - db0) * 1000 / args.requests
        name = "baseline" if args.baseline else "manager"
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"{name}: {args.requests} callbacks, CPU per request: app {app_ms:.3f} ms, "
            f"PostgreSQL backend {db_ms:.3f} ms (load {load})"
        )
        if profile:
            print("(app CPU is inflated by the profiler)")
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
