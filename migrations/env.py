"""Alembic environment: runs on the engine or connection that manager passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from manager import models  # noqa: F401  (registers the tables on Base.metadata)
from manager.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies tables
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Several hosts may run `manager serve` (which upgrades) at once: one upgrades,
            # the others wait here, then find the schema at head. The lock goes with the
            # transaction.
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('manager.migrate'))"))
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = config.attributes.get("engine")
    if engine is None:
        from sqlalchemy import create_engine

        engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
run_migrations_online()
