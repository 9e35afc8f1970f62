"""Helpers shared by the benchmark scripts: a database of their own, a free port."""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Iterator

from sqlalchemy import Connection, create_engine, make_url, text


@contextlib.contextmanager
def bench_database(
    admin_url: str, keep: bool = False, prefix: str = "manager_bench"
) -> Iterator[str]:
    """A new PostgreSQL database for this run; dropped afterwards unless `keep`."""
    url = make_url(admin_url).set(drivername="postgresql+psycopg")
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            if keep:
                print(f"kept database {name}")
            else:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def insert_running_tasks(conn: Connection, app_id: int, count: int, task_id_sql: str) -> None:
    """`count` running tasks, each with one run and its own owner; `task_id_sql` makes
    the task id from the series number `g` (a constant SQL expression of the caller's)."""
    conn.execute(
        text(
            "INSERT INTO tasks (app_id, task_id, owner, status, state_seq, state_rank, "  # noqa: S608
            "max_seq, owner_seq, owner_rank, runs, run_start_seen, started_at, "
            "first_seen_at, updated_at, last_delivery_at) "
            f"SELECT :app, {task_id_sql}, 'owner-' || g, 'running', 1, 2, 1, 1, 2, 1, true, "
            "now(), now(), now(), now() FROM generate_series(1, :n) AS g"
        ),
        {"app": app_id, "n": count},
    )
