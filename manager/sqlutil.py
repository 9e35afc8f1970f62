"""Small dialect-aware statements that the ORM does not spell portably."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session


def insert_ignore(
    session: Session,
    model: Any,
    values: Mapping[str, Any],
    conflict_columns: Sequence[str],
    index_where: ColumnElement[bool] | None = None,
) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True when this statement inserted the row.

    The database decides who wins: concurrent inserters of the same key wait for
    the first to commit and then insert nothing.
    """
    statement = _insert_ignore(
        session.get_bind().dialect.name, model, values, conflict_columns, index_where
    )
    return session.execute(statement).first() is not None


def insert_ignore_core(
    conn: Connection, model: Any, values: Mapping[str, Any], conflict_columns: Sequence[str]
) -> bool:
    """insert_ignore on a Core connection."""
    statement = _insert_ignore(conn.dialect.name, model, values, conflict_columns, None)
    return conn.execute(statement).first() is not None


def insert_ignore_rows(
    conn: Connection, model: Any, rows: Sequence[Mapping[str, Any]], batch: int = 1000
) -> None:
    """Many rows, INSERT … ON CONFLICT DO NOTHING on the primary key: rows another
    process inserted first stay as they are."""
    insert = insert_for(conn.dialect.name)
    for at in range(0, len(rows), batch):
        conn.execute(insert(model.__table__).on_conflict_do_nothing(), rows[at : at + batch])


def insert_for(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _insert_ignore(
    dialect: str,
    model: Any,
    values: Mapping[str, Any],
    conflict_columns: Sequence[str],
    index_where: ColumnElement[bool] | None,
) -> Any:
    insert = insert_for(dialect)
    table = model.__table__
    return (
        insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=list(conflict_columns), index_where=index_where)
        .returning(table.primary_key.columns.values()[0])
    )


def driver_execute(conn: Connection, statement: str, params: Mapping[str, Any]) -> Any:
    """Run one row-returning statement, in the DBAPI's paramstyle, on the connection's own
    DBAPI cursor, and return its first row (a tuple) or None.

    For the few statements of a hot path: it skips SQLAlchemy's per-execution set-up
    (compiled-cache lookup, bind and result processing), which costs several times the
    driver's own work. Each DBAPI connection keeps one cursor per statement, so that
    psycopg's adaptation state for the statement (it is kept while a cursor runs the
    same query object again) is reused: pass module-level constants. Errors still
    surface as SQLAlchemy's DBAPIError, and a connection found dead is invalidated,
    with the rest of the pool, as Connection.execute would.
    """
    return driver_send(conn, statement, params).fetchone()


def driver_send(conn: Connection, statement: str, params: Mapping[str, Any]) -> Any:
    """Like driver_execute, but returns the cursor unread: in pipeline mode the statement
    is only queued, and its row is read (cursor.fetchone()) after a later sync, such as
    the commit's (see db.write_then_read)."""
    dbapi = conn.dialect.loaded_dbapi
    proxied = conn.connection
    # Dropped with the DBAPI connection (a pool's info dict goes with it).
    cursors: dict[str, Any] = proxied.info.setdefault(_CURSORS, {})
    cursor = cursors.get(statement)
    try:
        if cursor is None:
            cursor = cursors[statement] = proxied.cursor()
        cursor.execute(statement, params)
        return cursor
    except dbapi.Error as exc:
        invalidated = conn.dialect.is_disconnect(exc, proxied.dbapi_connection, cursor)
        if invalidated:
            conn.invalidate(exc)
            # The others are most likely dead too (a restart): let them be replaced.
            conn.engine.dispose(close=False)
        raise DBAPIError.instance(
            statement, params, exc, dbapi.Error, connection_invalidated=invalidated
        ) from exc


_CURSORS = "manager.driver_cursors"
