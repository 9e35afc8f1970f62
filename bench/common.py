"""Helpers shared by the benchmark scripts: a database of their own, a free port."""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Iterator

from sqlalchemy import create_engine, make_url, text


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
